"""nn.Module contracts that the fused Triton path must honour as nn.Linear around the quantizer would.

The fused kernels read ``project_in.weight``/``project_out.weight`` directly, so they may only stand in for
plain ``nn.Linear`` layers: a hook, a subclass (LoRA-style adapters), a parametrization (``weight_norm``) or a
replaced module must run as itself. Each test compares the Triton path (kernels under the interpreter) with
the PyTorch path on the same module state, and checks that what the user added actually took effect.
Also: ``.to("meta")``, unsigned index dtypes, ``torch.jit.trace``, a too large ``implicit_codebook``, and the
cost of ``import fsq_triton``.
"""

import copy
import os
import statistics
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from conftest import interpreting, ref_indices_to_codes

import fsq_triton.module
from fsq_triton import FSQ


LEVELS = [8, 5, 5, 5]
DIM = 12


def pair(seed=0, device="cpu", **kwargs):
    torch.manual_seed(seed)
    triton = FSQ(LEVELS, dim=DIM, backend="triton", **kwargs).to(device)
    reference = copy.deepcopy(triton)
    reference.backend = "torch"
    return triton, reference


def inputs(shape=(2, DIM, 3, 4), seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 1.5).to(device)


def run(fsq, z):
    """forward, a backward, and the decode of the indices: what a tokenizer's training step touches."""
    z = z.detach().clone().requires_grad_()
    out, indices = fsq(z)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
    grads = {name: p.grad.clone() for name, p in fsq.named_parameters() if p.grad is not None}
    fsq.zero_grad()
    return out.detach(), indices, z.grad, grads, fsq.indices_to_codes(indices).detach()


def assert_same_results(actual, expected):
    out, indices, z_grad, grads, decoded = actual
    ref_out, ref_indices, ref_z_grad, ref_grads, ref_decoded = expected
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_grad, ref_z_grad, rtol=1e-4, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(decoded, ref_decoded, rtol=1e-5, atol=1e-6)


def both(setup, device, seed=0, **kwargs):
    """``setup(fsq)`` applied to a module on each backend, then both moved to ``device``."""
    triton, reference = pair(seed, **kwargs)
    setup(triton)
    setup(reference)
    return triton.to(device), reference.to(device)


# --------------------------------------------------------------------------------------------------
# Hooks, subclasses, parametrizations, replaced modules
# --------------------------------------------------------------------------------------------------


def test_forward_hooks_fire_on_the_triton_path(device):
    calls = []

    def setup(fsq):
        fsq.project_in.register_forward_pre_hook(lambda m, args: calls.append("pre-in"))
        fsq.project_in.register_forward_hook(lambda m, args, out: calls.append("in"))
        fsq.project_out.register_forward_hook(lambda m, args, out: calls.append("out"))

    triton, reference = both(setup, device)
    z = inputs(device=device)
    triton(z)
    assert calls == ["pre-in", "in", "out"]
    calls.clear()
    triton.indices_to_codes(triton(z)[1])
    assert calls == ["pre-in", "in", "out", "out"]
    assert_same_results(run(triton, z), run(reference, z))


def test_forward_hook_that_changes_the_output_is_honoured(device):
    def setup(fsq):
        fsq.project_in.register_forward_hook(lambda m, args, out: out * 3.0 + 0.5)
        fsq.project_out.register_forward_hook(lambda m, args, out: -out)

    triton, reference = both(setup, device)
    plain, _ = pair(device=device)
    z = inputs(device=device)
    results = run(triton, z)
    assert_same_results(results, run(reference, z))
    assert not torch.equal(results[1], plain(z)[1]), "the hook on project_in must change the indices"


def test_global_module_hooks_fire_on_the_triton_path(device):
    triton, reference = pair(device=device)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(type(m).__name__) if isinstance(m, nn.Linear) else None
    )
    try:
        z = inputs(device=device)
        triton(z)
        assert seen == ["Linear", "Linear"]
        assert_same_results(run(triton, z), run(reference, z))
    finally:
        handle.remove()
    seen.clear()
    triton(z)
    assert seen == [], "without hooks the projections are fused again"


class LoRALinear(nn.Linear):
    """A LoRA-style adapter: nn.Linear plus a trainable low-rank update (its forward, not its weight, changes)."""

    def __init__(self, linear: nn.Linear, rank: int = 2, scale: float = 0.5):
        super().__init__(linear.in_features, linear.out_features)
        self.load_state_dict(linear.state_dict())
        self.lora_a = nn.Parameter(torch.randn(rank, linear.in_features) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(linear.out_features, rank) * 0.3)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) + self.scale * (x @ self.lora_a.t() @ self.lora_b.t())


def test_linear_subclass_runs_its_own_forward(device):
    def setup(fsq):
        torch.manual_seed(3)
        fsq.project_in = LoRALinear(fsq.project_in)
        torch.manual_seed(4)
        fsq.project_out = LoRALinear(fsq.project_out)

    triton, reference = both(setup, device)
    plain, _ = pair(device=device)
    z = inputs(device=device)
    results = run(triton, z)
    assert_same_results(results, run(reference, z))
    assert {"project_in.lora_a", "project_in.lora_b", "project_out.lora_a", "project_out.lora_b"} <= results[3].keys()
    assert not torch.equal(results[1], plain(z)[1]), "the adapter must change the indices"


def test_weight_norm_parametrization(device):
    def setup(fsq):
        parametrizations.weight_norm(fsq.project_in)
        parametrizations.weight_norm(fsq.project_out)
        with torch.no_grad():  # a magnitude that differs from the weights' norm, so the parametrization matters
            fsq.project_in.parametrizations.weight.original0.mul_(2.0)
            fsq.project_out.parametrizations.weight.original0.mul_(0.5)

    triton, reference = both(setup, device)
    plain, _ = pair(device=device)
    z = inputs(device=device)
    results = run(triton, z)
    assert_same_results(results, run(reference, z))
    assert "project_in.parametrizations.weight.original0" in results[3]
    assert not torch.equal(results[1], plain(z)[1]), "the parametrization must change the indices"


def test_legacy_weight_norm_hook(device):
    """torch.nn.utils.weight_norm (the deprecated one) recomputes the weight in a forward pre-hook."""
    import warnings

    def setup(fsq):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(fsq.project_in)
        with torch.no_grad():
            fsq.project_in.weight_g.mul_(2.0)

    triton, reference = both(setup, device)
    z = inputs(device=device)
    assert_same_results(run(triton, z), run(reference, z))


def test_replaced_projections(device):
    def setup(fsq):
        torch.manual_seed(5)
        fsq.project_in = nn.Sequential(nn.Linear(DIM, 8), nn.GELU(), nn.Linear(8, len(LEVELS)))
        fsq.project_out = nn.Sequential(nn.Linear(len(LEVELS), 8), nn.Tanh(), nn.Linear(8, DIM))

    triton, reference = both(setup, device)
    z = inputs(device=device)
    assert_same_results(run(triton, z), run(reference, z))
    # sequences too
    z = inputs((2, 7, DIM), device=device)
    assert_same_results(run(triton, z), run(reference, z))


def test_replaced_projection_of_the_wrong_width_is_a_clear_error(device):
    fsq, _ = pair(device=device)
    fsq.project_in = nn.Linear(DIM, 3)
    with pytest.raises(ValueError, match="project_in must map"):
        fsq(inputs(device=device))


def test_identity_stand_ins_are_called_when_replaced(device):
    """Without projections the reference still calls project_in/project_out (nn.Identity); a replacement runs."""
    def setup(fsq):
        fsq.project_in = nn.Tanh()
        fsq.project_out = nn.Softsign()

    torch.manual_seed(0)
    triton = FSQ(LEVELS, backend="triton")
    reference = FSQ(LEVELS, backend="torch")
    for fsq in (triton, reference):
        setup(fsq)
        fsq.to(device)
    z = inputs((2, len(LEVELS), 3, 4), device=device)
    assert_same_results(run(triton, z), run(reference, z))
    out, _ = triton(z)
    assert out.abs().max() < 1, "project_out (softsign) was applied"


# --------------------------------------------------------------------------------------------------
# meta tensors, unsigned indices, torch.jit.trace, the implicit codebook
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [None, 16], ids=["no-projections", "projections"])
@pytest.mark.parametrize("shape_kind", ["image", "sequence"])
def test_meta_device_forward(dim, shape_kind):
    fsq = FSQ([8, 6, 5], dim=dim, num_codebooks=2).to("meta")
    channels = fsq.dim
    z = torch.empty((2, channels, 3, 4) if shape_kind == "image" else (2, 7, channels), device="meta", dtype=torch.bfloat16)
    out, indices = fsq(z)
    assert out.device.type == "meta" and out.shape == z.shape and out.dtype == torch.bfloat16
    assert indices.device.type == "meta" and indices.dtype == torch.int32
    assert indices.shape == ((2, 3, 4, 2) if shape_kind == "image" else (2, 7, 2))
    codes = fsq.indices_to_codes(indices)
    assert codes.device.type == "meta" and codes.shape == z.shape


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dim", [None, DIM], ids=["no-projections", "projections"])
def test_unsigned_indices(device, dtype, backend, dim):
    torch.manual_seed(0)
    fsq = FSQ(LEVELS, dim=dim, backend=backend).to(device)
    high = min(fsq.codebook_size, torch.iinfo(dtype).max + 1)
    indices = torch.randint(0, high, (2, 3, 4), generator=torch.Generator().manual_seed(2)).to(device)
    codes = fsq.indices_to_codes(indices.to(dtype))
    torch.testing.assert_close(codes, fsq.indices_to_codes(indices), rtol=0, atol=0)
    if dim is None:
        expected = ref_indices_to_codes(indices, LEVELS).movedim(-1, 1)
        torch.testing.assert_close(codes, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unsigned_indices_out_of_range(backend):
    if backend == "triton" and not interpreting():
        pytest.skip("the Triton path runs on CPU tensors only with TRITON_INTERPRET=1 (on CUDA the range is not checked)")
    fsq = FSQ(LEVELS, backend=backend)
    for dtype, bad in [(torch.uint16, 1000), (torch.uint32, 2**32 - 1), (torch.uint64, 2**64 - 1)]:
        indices = torch.zeros(2, 5, dtype=dtype)
        indices[1, 2] = bad if bad < 2**63 else -1  # uint64's largest value (a torch literal must fit int64)
        with pytest.raises(IndexError, match=f"found {bad}"):
            fsq.indices_to_codes(indices)


@pytest.mark.parametrize("dim", [None, DIM], ids=["no-projections", "projections"])
def test_jit_trace_on_the_triton_path(device, dim):
    torch.manual_seed(0)
    fsq = FSQ(LEVELS, dim=dim, backend="triton").to(device)
    channels = fsq.dim
    z = inputs((2, channels, 3, 4), device=device)
    traced = torch.jit.trace(fsq, (z,), check_trace=False)
    z2 = inputs((2, channels, 3, 4), seed=5, device=device)  # a trace is a program, not a recording of one input
    out, indices = traced(z2)
    ref_out, ref_indices = fsq(z2)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert any("fsq_triton::" in node.kind() for node in traced.inlined_graph.nodes()), "the trace holds the fused ops"
    # and the traced program is differentiable
    z3 = z2.clone().requires_grad_()
    traced(z3)[0].sum().backward()
    z4 = z2.clone().requires_grad_()
    fsq(z4)[0].sum().backward()
    torch.testing.assert_close(z3.grad, z4.grad, rtol=1e-5, atol=1e-6)


def test_implicit_codebook_too_large_is_a_clear_error():
    fsq = FSQ([1000] * 3)
    assert fsq._buffers["implicit_codebook"] is None
    with pytest.raises(MemoryError, match=r"3000000000 values \(11\.2 GiB in float32\).*IMPLICIT_CODEBOOK_LIMIT = 2\*\*28"):
        fsq.implicit_codebook
    assert fsq.codebook_size == 10**9  # the module itself is fine: forward and decode never build the codebook


def test_implicit_codebook_at_the_limit_is_built(monkeypatch):
    monkeypatch.setattr(fsq_triton.module, "IMPLICIT_CODEBOOK_LIMIT", 33 * 32 * 32 * 32 * 4)
    fsq = FSQ([33, 32, 32, 32])
    book = fsq.implicit_codebook
    assert book.shape == (fsq.codebook_size, 4)
    monkeypatch.setattr(fsq_triton.module, "IMPLICIT_CODEBOOK_LIMIT", 33 * 32 * 32 * 32 * 4 - 1)
    with pytest.raises(MemoryError, match="4325376 values"):
        FSQ([33, 32, 32, 32]).implicit_codebook


# --------------------------------------------------------------------------------------------------
# import time
# --------------------------------------------------------------------------------------------------


def _added_import_seconds() -> float:
    """Seconds that ``import fsq_triton`` takes in a fresh process that has imported torch already, as
    ``python -X importtime`` measures it (the cumulative time of the ``fsq_triton`` import: what it adds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import torch; import fsq_triton"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    for line in result.stderr.splitlines():  # "import time: self [us] | cumulative | imported package"
        fields = line.split("|")
        if len(fields) == 3 and fields[2].strip() == "fsq_triton":
            return int(fields[1]) / 1e6
    raise AssertionError(f"no fsq_triton line in -X importtime's report:\n{result.stderr[-2000:]}")


def test_import_costs_little_over_torch():
    """``import fsq_triton`` adds at most 0.3 s to ``import torch`` (median of fresh processes; about 0.02 s on a
    2-core CPU, where it was 2 s when it imported the ops): the Triton ops and torch's compile machinery load on
    first use."""
    added = statistics.median(_added_import_seconds() for _ in range(3))
    print(f"import fsq_triton after import torch: {added:.3f} s")
    assert added < 0.3, f"import fsq_triton adds {added:.2f} s to import torch"


def test_ops_load_on_first_use():
    """After a bare import nothing heavy is loaded, yet torch.ops.fsq_triton.* are there when looked up."""
    code = (
        "import sys, torch, fsq_triton\n"
        "heavy = [m for m in ('triton', 'torch._dynamo', 'torch._inductor', 'fsq_triton.ops') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "op = torch.ops.fsq_triton.quantize\n"
        "assert 'fsq_triton.ops' in sys.modules\n"
        "from fsq_triton import ResidualFSQ\n"
        "print('ok', op)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_saved_programs_load_in_a_fresh_process(tmp_path, device):
    """torch.export.load finds the fused ops after a bare ``import fsq_triton`` (they load when looked up);
    torch.jit.load, which resolves ops in C++, needs ``import fsq_triton.ops`` first (README says so)."""
    if device != "cpu":
        pytest.skip("runs the saved programs on CPU tensors")
    save = (
        "import torch\n"
        "from fsq_triton import FSQ\n"
        "torch.manual_seed(0)\n"
        "fsq = FSQ([8, 5, 5, 5], dim=12, backend='triton')\n"
        "z = torch.randn(2, 12, 3, 5)\n"
        f"torch.export.save(torch.export.export(fsq, (z,)), r'{tmp_path}/fsq.pt2')\n"
        f"torch.jit.save(torch.jit.trace(fsq, (z,), check_trace=False), r'{tmp_path}/fsq.pt')\n"
        f"torch.save((z, fsq(z)), r'{tmp_path}/expected.pt')\n"
    )
    load = (
        "import torch, fsq_triton\n"
        f"z, (out, indices) = torch.load(r'{tmp_path}/expected.pt')\n"
        f"e_out, e_indices = torch.export.load(r'{tmp_path}/fsq.pt2').module()(z)\n"
        "assert torch.equal(e_indices, indices) and torch.allclose(e_out, out, atol=1e-6)\n"
        "import fsq_triton.ops\n"
        f"j_out, j_indices = torch.jit.load(r'{tmp_path}/fsq.pt')(z)\n"
        "assert torch.equal(j_indices, indices) and torch.allclose(j_out, out, atol=1e-6)\n"
        "print('ok')\n"
    )
    for code in (save, load):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_compiled_module_honours_hooks_and_subclasses(device):
    """torch.compile(fullgraph=True) takes the same decision as eager: a hooked or subclassed projection runs as itself."""
    def setup(fsq):
        torch.manual_seed(6)
        fsq.project_in = LoRALinear(fsq.project_in)
        fsq.project_out.register_forward_hook(lambda m, args, out: out * 0.5 - 1.0)

    triton, reference = both(setup, device)
    z = inputs(device=device)
    out, indices = torch.compile(triton, fullgraph=True)(z)
    ref_out, ref_indices = reference(z)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


def test_global_hooks_reach_the_identity_stand_ins(device):
    """Without projections the reference still calls project_in/project_out; a global hook sees those calls too."""
    triton = FSQ(LEVELS, backend="triton").to(device)
    reference = FSQ(LEVELS, backend="torch").to(device)
    z = inputs((2, len(LEVELS), 3, 4), device=device)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(type(m).__name__) if isinstance(m, nn.Identity) else None
    )
    try:
        results = run(triton, z)
        assert seen[:2] == ["Identity", "Identity"]
        assert_same_results(results, run(reference, z))
    finally:
        handle.remove()
