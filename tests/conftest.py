"""Shared setup of the fsq_triton test suite.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be switched
on before triton (or fsq_triton's kernels) is imported: hence the first lines below. On a CUDA machine a
plain ``pytest`` leaves the interpreter off, so the real kernels compile and the ``gpu`` tests run there
(``pytest -m gpu`` runs only those); ``TRITON_INTERPRET=1`` forces the interpreter anywhere.

Helpers here are imported by the test modules (``from conftest import ...``); they use plain torch
ops only, never fsq_triton's quantizer, so that they can serve as an independent reference.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fsq_triton._mode import interpreting  # noqa: E402  (TRITON_INTERPRET read as Triton reads it)

BACKENDS = ("torch", "triton")
GOLDEN_PATH = Path(__file__).parent / "data" / "fsq_reference_cases.pt"
EPS = 1e-3


def gpu_available() -> bool:
    """A CUDA device with real (compiled) Triton kernels: what the ``gpu`` tests need."""
    return torch.cuda.is_available() and not interpreting()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Both backends; "triton" runs the kernels on CPU tensors, so it needs the interpreter."""
    if request.param == "triton" and not interpreting():
        pytest.skip("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return request.param


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Where the Triton path runs: CPU tensors under the interpreter (CI), CUDA tensors with compiled kernels on a
    GPU machine."""
    if request.param == "cpu" and not interpreting():
        pytest.skip("the Triton path runs on CPU tensors only with TRITON_INTERPRET=1")
    if request.param == "cuda" and not gpu_available():
        pytest.skip("needs a CUDA GPU and compiled kernels (TRITON_INTERPRET=0)")
    return request.param


@pytest.fixture(scope="session")
def golden():
    return torch.load(GOLDEN_PATH, weights_only=True)


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with the interpreter off (TRITON_INTERPRET unset or 0)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------------
# An independent reference of the FSQ math (docs/semantics.md), in plain torch ops
# --------------------------------------------------------------------------------------------------


def ref_constants(levels, device="cpu"):
    """The reference's per-level float32 constants, computed as it does from an int32 tensor."""
    lv = torch.tensor(list(levels), dtype=torch.int32, device=device)
    half_l = (lv - 1) * (1 + EPS) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    half_width = lv // 2
    return lv, half_l, offset, shift, half_width


def ref_basis(levels):
    """Exclusive cumulative product of the levels, as Python ints."""
    basis, acc = [], 1
    for level in levels:
        basis.append(acc)
        acc *= level
    return basis


def ref_quantize_tokens(z, levels):
    """Reference FSQ of channel-last tokens ``z (..., d)``, math in float32.

    Returns (codes float32 (..., d), integer levels int64 (..., d), indices int64 (...,)) with the
    index computed exactly from the integer levels; tokens with a NaN channel get index -1 and
    NaN codes at their NaN channels.
    """
    lv, half_l, offset, shift, half_width = ref_constants(levels, z.device)
    zf = z.float()
    bounded = (zf + shift).tanh() * half_l - offset
    q = bounded + (bounded.round() - bounded)  # the reference's round_ste, forward value
    codes = q / half_width
    level = (q + half_width).nan_to_num(0.0).to(torch.int64)
    basis = torch.tensor(ref_basis(levels), dtype=torch.int64, device=z.device)
    indices = (level * basis).sum(-1)
    indices = torch.where(zf.isnan().any(-1), -1, indices)
    return codes, level, indices


def ref_grad_tokens(z, grad_out, levels):
    """Reference straight-through gradient of the codes w.r.t. ``z (..., d)``, in float64 for accuracy."""
    _, half_l, _, shift, half_width = ref_constants(levels, z.device)
    t = (z.double() + shift.double()).tanh()
    return grad_out.double() * half_l.double() / half_width.double() * (1 - t * t)


def ref_forward(z, levels, num_codebooks=1, keep_num_codebooks_dim=None):
    """Reference FSQ forward without projections: ``(out float32, indices int64)`` for a sequence
    ``(b, n, c*d)`` or a channel-first ``(b, c*d, *spatial)`` input."""
    if keep_num_codebooks_dim is None:
        keep_num_codebooks_dim = num_codebooks > 1
    d = len(levels)
    channel_first = z.ndim >= 4
    x = z.movedim(1, -1) if channel_first else z  # (b, *spatial, c*d)
    x = x.reshape(*x.shape[:-1], num_codebooks, d)
    codes, _, indices = ref_quantize_tokens(x, levels)
    out = codes.reshape(*codes.shape[:-2], num_codebooks * d)
    if channel_first:
        out = out.movedim(-1, 1)
    if not keep_num_codebooks_dim:
        indices = indices.squeeze(-1)
    return out, indices


def ref_indices_to_codes(indices, levels):
    """Codes ``(..., d)`` of integer indices ``(...)``, exactly: ``(level - hw) / hw`` in float32."""
    basis = torch.tensor(ref_basis(levels), dtype=torch.int64, device=indices.device)
    lv = torch.tensor(list(levels), dtype=torch.int64, device=indices.device)
    level = (indices.to(torch.int64)[..., None] // basis) % lv
    half_width = lv // 2
    return (level - half_width).float() / half_width.float()


def random_grid_codes(levels, shape, generator=None):
    """Random codes on the FSQ grid, float32 ``(*shape, d)``, and their integer levels."""
    lv = torch.tensor(list(levels), dtype=torch.int64)
    u = torch.rand(*shape, len(levels), generator=generator, dtype=torch.float64)
    level = (u * lv).floor().to(torch.int64).clamp_max(lv - 1)
    half_width = lv // 2
    return (level - half_width).float() / half_width.float(), level


def bits(t):
    """Bit patterns of a float tensor, to compare values exactly (signed zeros, NaN payloads)."""
    t = t.contiguous()
    view = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.view(view[t.dtype])


def assert_bitwise_equal(a, b, msg=""):
    """Same shape, dtype and bit pattern, except that NaNs only need to sit at the same places."""
    assert a.shape == b.shape, f"{msg}: shapes {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{msg}: dtypes {a.dtype} != {b.dtype}"
    if not a.is_floating_point():
        mismatches = (a != b).sum().item()
    else:
        nan_a, nan_b = a.isnan(), b.isnan()
        assert torch.equal(nan_a, nan_b), f"{msg}: NaNs at different places"
        mismatches = ((bits(a) != bits(b)) & ~nan_a).sum().item()
    assert mismatches == 0, f"{msg}: {mismatches} of {a.numel()} values differ bitwise"


def codebook_size(levels):
    return math.prod(levels)


def run_gloo_workers(worker, nprocs=2, limit_s=120):
    """Run ``worker(rank, nprocs, port, out_dir)`` in ``nprocs`` spawned processes on a free loopback port, and
    return what each rank wrote to ``out_dir/rank{r}.json``. A hang (a collective that never completes) fails the
    test after ``limit_s`` seconds instead of blocking the suite."""
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(worker, args=(nprocs, port, out_dir), nprocs=nprocs, join=False, start_method="spawn")
        for _ in range(limit_s):
            if context.join(timeout=1):
                break
        else:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} gloo workers did not finish in {limit_s} s (hang)")
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(nprocs)]
