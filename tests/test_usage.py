"""``track_usage`` counted by the forward kernel itself, and ``return_indices=False`` without any index work.

On the Triton path the forward kernel (with projections, the fused projected kernel) adds each token's code to
``usage_counts`` (int64 atomics, one per token and codebook; a NaN token counts nowhere) and, without
``return_indices``, stores no indices (the plain kernel, counting nothing, reduces none either), so codebooks past
int32 work. The counts must equal ``torch.bincount`` of the indices the same forward returns, on
both backends, for every layout, with several codebooks and NaN tokens, and no forward may read a tensor on the
host. The GPU tests (``gpu`` marker) check the same with CUDA's sync debug mode and inside a captured CUDA graph.
"""

import sys

import pytest
import torch

from conftest import gpu_available

from fsq_triton import FSQ
from fsq_triton.module import USAGE_CODEBOOK_LIMIT

LEVELS = [5, 4, 3]  # 60 codes


def bincounts(indices, c, size):
    """(c, size) int64 counts of the (..., c) indices, -1 (a NaN token) left out: the independent reference."""
    flat = indices.reshape(-1, c)
    return torch.stack([torch.bincount(flat[:, k][flat[:, k] >= 0].long(), minlength=size) for k in range(c)])


def check_three_forwards(fsq, shape, c):
    """Three forwards accumulate, the second with NaN tokens (the first and last values NaN), which count nowhere:
    after each, ``usage_counts`` is the bincount of every index returned so far. Returns the last input and counts."""
    expected = torch.zeros(c, 60, dtype=torch.int64)
    for seed in range(3):
        z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2
        if seed == 1:
            z.view(-1)[0] = float("nan")
            z.view(-1)[-1] = float("nan")
        _, indices = fsq(z)
        if seed == 1:
            assert (indices == -1).any()
        expected += bincounts(indices, c, 60)
        assert torch.equal(fsq.usage_counts, expected)
    return z, expected


SHAPES = [
    pytest.param((2, 9, 6), False, id="sequence"),
    pytest.param((3, 1, 6), False, id="sequence-n1"),
    pytest.param((2, 6, 3, 5), False, id="image"),
    pytest.param((1, 6, 2, 3, 4), False, id="video"),
    pytest.param((2, 6, 11), True, id="channel-first-sequence"),
]


@pytest.mark.parametrize("shape,channel_first", SHAPES)
def test_counts_equal_bincount_of_the_returned_indices(shape, channel_first, backend):
    c = 2
    fsq = FSQ(LEVELS, num_codebooks=c, track_usage=True, channel_first=channel_first, backend=backend)
    check_three_forwards(fsq, shape, c)  # NaN tokens: one in each codebook's channels, and one with both
    assert fsq.usage_counts.dtype == torch.int64


@pytest.mark.parametrize("channel_first", [False, True])
def test_counts_without_returning_indices(channel_first, backend):
    """return_indices=False with track_usage=True: the kernel counts codes it never stores; the same counts as a
    module that returns its indices."""
    c = 2
    counted = FSQ(LEVELS, num_codebooks=c, track_usage=True, return_indices=False, channel_first=channel_first, backend=backend)
    reference = FSQ(LEVELS, num_codebooks=c, backend="torch", channel_first=channel_first)
    z = torch.randn(2, 6, 13, generator=torch.Generator().manual_seed(3)) if channel_first else torch.randn(2, 13, 6)
    z.view(-1)[5] = float("nan")
    out, indices = counted(z)
    expected_out, expected_indices = reference(z)
    assert indices is None
    assert torch.equal(out.nan_to_num(9.0), expected_out.nan_to_num(9.0))
    assert torch.equal(counted.usage_counts, bincounts(expected_indices, c, 60))


def test_the_triton_forward_counts_in_the_kernel(monkeypatch):
    """On the Triton path no separate counting pass runs (``_count_usage``, the PyTorch path's index_add_, is not
    called) and the kernel gets the module's own buffer: it adds to it in place."""
    if not _triton_runs_here():
        pytest.skip("needs the Triton path (a GPU, or TRITON_INTERPRET=1)")
    fsq = FSQ(LEVELS, num_codebooks=2, track_usage=True, backend="triton")
    buffer = fsq.usage_counts

    def no_pass(indices):
        raise AssertionError("a separate counting pass ran")

    monkeypatch.setattr(fsq, "_count_usage", no_pass)
    z = torch.randn(2, 9, 6)
    _, indices = fsq(z)
    assert fsq.usage_counts is buffer and torch.equal(buffer, bincounts(indices, 2, 60))


def test_counts_across_programs_and_partial_blocks(backend):
    """Several programs per row and a partial last block add into one histogram (forced small blocks)."""
    from fsq_triton import autotune

    c = 2
    fsq = FSQ([8, 6, 5], num_codebooks=c, track_usage=True, backend=backend)
    z = torch.randn(3, 3 * 16 + 5, 6, generator=torch.Generator().manual_seed(1)) * 3
    z[1, 7, 2] = float("nan")
    with autotune.forced_config({"BLOCK_N": 16, "num_warps": 4}):
        _, indices = fsq(z)
        _, indices_cf = fsq(z.transpose(1, 2).unsqueeze(-1))  # channel-first image, same tokens
    assert torch.equal(indices_cf.reshape(indices.shape), indices)
    assert torch.equal(fsq.usage_counts, 2 * bincounts(indices, c, 240))


@pytest.mark.parametrize("channel_first", [False, True])
def test_counts_with_64_bit_offsets(channel_first, monkeypatch):
    """The 64-bit-offset variant (taken past 2**31 elements; forced here) counts the same."""
    if not _triton_runs_here():
        pytest.skip("needs the Triton path (a GPU, or TRITON_INTERPRET=1)")
    from fsq_triton.ops import fsq as fsq_ops

    monkeypatch.setattr(fsq_ops, "_needs_int64", lambda *tensors: True)
    fsq = FSQ(LEVELS, num_codebooks=2, track_usage=True, channel_first=channel_first, backend="triton")
    reference = FSQ(LEVELS, num_codebooks=2, channel_first=channel_first, backend="torch")
    z = torch.randn(2, 6, 13) if channel_first else torch.randn(2, 13, 6)
    out, indices = fsq(z)
    expected_out, expected_indices = reference(z)
    assert torch.equal(out, expected_out) and torch.equal(indices, expected_indices)
    assert torch.equal(fsq.usage_counts, bincounts(expected_indices, 2, 60))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_counts_half_precision(dtype, backend):
    fsq = FSQ(LEVELS, num_codebooks=2, track_usage=True, backend=backend)
    z = (torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    _, indices = fsq(z)
    assert torch.equal(fsq.usage_counts, bincounts(indices, 2, 60))


def test_counts_with_gradients_and_projections(backend):
    """A training step (the autograd path), with fused projections (the projected kernel's count) and without (the
    plain kernel's count); gradients as on the PyTorch path."""
    for dim in (None, 7):
        for return_indices in (True, False):
            torch.manual_seed(0)
            fsq = FSQ(LEVELS, dim=dim, num_codebooks=2, track_usage=True, return_indices=return_indices, backend=backend)
            torch.manual_seed(0)
            reference = FSQ(LEVELS, dim=dim, num_codebooks=2, backend="torch")
            z = torch.randn(2, 9, fsq.dim, generator=torch.Generator().manual_seed(4), requires_grad=True)
            z_ref = z.detach().clone().requires_grad_(True)
            out, indices = fsq(z)
            expected_out, expected_indices = reference(z_ref)
            (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
            (expected_out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
            torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)
            assert (indices is None) != return_indices
            assert torch.equal(fsq.usage_counts, bincounts(expected_indices, 2, 60))


@pytest.mark.parametrize("dim", [None, 7], ids=["no-projections", "projections"])
def test_forward_reads_nothing_on_the_host(monkeypatch, backend, dim):
    """No host sync: no fsq_triton code reads a tensor on the host (``item``, ``tolist``, ``cpu``, ``numpy``,
    ``bool``/``int``/``float`` of a tensor) during a counted forward, and the counts stay a device tensor.
    (Triton's interpreter copies tensors to NumPy itself: only calls made from fsq_triton's own files count.)"""
    fsq = FSQ(LEVELS, dim=dim, num_codebooks=2, track_usage=True, return_indices=False, backend=backend)
    z = torch.randn(2, 9, fsq.dim)
    fsq(z)  # the first call may calibrate and cache; the check is on the steady state
    calls = []

    def watch(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "fsq_triton" in caller and "/tests/" not in caller:
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        watch(name)
    fsq(z)
    fsq(z.transpose(1, 2).unsqueeze(-1))
    monkeypatch.undo()
    assert not calls, calls
    usage = fsq.codebook_usage()
    assert all(isinstance(v, torch.Tensor) for v in usage.values())
    assert usage["counts"].sum() == 3 * 2 * 9 * 2  # three forwards of 18 tokens, two codebooks


def test_usage_limit_is_a_clear_error():
    """Up to 2**20 codes per codebook; past it a ValueError that names the limit (with or without indices, also
    for a codebook past int32, where the usage limit is the error that applies)."""
    assert USAGE_CODEBOOK_LIMIT == 2**20
    FSQ([32, 32, 32, 32], track_usage=True, return_indices=False, backend="torch")  # exactly 2**20
    for levels in ([32, 32, 32, 33], [16] * 10):
        with pytest.raises(ValueError, match=r"past the limit of 2\*\*20"):
            FSQ(levels, track_usage=True, return_indices=False)
    with pytest.raises(ValueError, match="past the limit of 2\\*\\*20"):
        FSQ([32, 32, 32, 33], track_usage=True)


# --------------------------------------------------------------------------------------------------
# return_indices=False: no index work, so codebooks past int32 work
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel_first", [False, True])
def test_codebooks_past_int32_without_indices(channel_first, backend):
    levels = [16] * 10  # 2**40 codes
    with pytest.raises(ValueError, match="exceeds the int32 range"):
        FSQ(levels)  # indices requested: a clear error
    fsq = FSQ(levels, num_codebooks=2, return_indices=False, channel_first=channel_first, backend=backend)
    reference = FSQ(levels, num_codebooks=2, return_indices=False, channel_first=channel_first, backend="torch")
    z = torch.randn(2, 20, 7, generator=torch.Generator().manual_seed(0)) * 3
    z[0, 3, 1] = float("nan")
    z = z if channel_first else z.transpose(1, 2)  # a strided (b, n, dim) sequence
    out, indices = fsq(z)
    assert indices is None
    assert torch.equal(out.nan_to_num(9.0), reference(z)[0].nan_to_num(9.0))


def test_codebooks_past_int32_without_indices_with_projections(backend):
    """With projections (fused on the Triton path): the same outputs as the PyTorch path, no indices."""
    torch.manual_seed(0)
    fsq = FSQ([16] * 10, dim=9, return_indices=False, backend=backend)
    torch.manual_seed(0)
    reference = FSQ([16] * 10, dim=9, return_indices=False, backend="torch")
    z = torch.randn(2, 7, 9, generator=torch.Generator().manual_seed(1))
    out, indices = fsq(z)
    assert indices is None
    torch.testing.assert_close(out, reference(z)[0], rtol=1e-5, atol=1e-5)


def test_vmap_counts_every_sample(backend):
    """torch.func.vmap over the module: the vmapped samples fold into the batch, all counted in one histogram."""
    fsq = FSQ(LEVELS, num_codebooks=2, track_usage=True, backend=backend)
    z = torch.randn(3, 2, 9, 6, generator=torch.Generator().manual_seed(8))
    out, indices = torch.func.vmap(fsq)(z)
    assert indices.shape == (3, 2, 9, 2)
    assert torch.equal(fsq.usage_counts, bincounts(indices, 2, 60))
    without = FSQ(LEVELS, num_codebooks=2, track_usage=True, return_indices=False, backend=backend)
    out_without, none = torch.func.vmap(without, out_dims=(0, None))(z)
    assert none is None and torch.equal(out_without, out)
    assert torch.equal(without.usage_counts, fsq.usage_counts)


@pytest.mark.parametrize("dim", [None, 7])
def test_grad_transforms_count_every_sample(dim, backend):
    """torch.func.vmap(torch.func.grad(...)): counted once per sample (the kernel, plain or with fused projections, or
    the index_add_ of the PyTorch path, outside the transforms), the gradient as without tracking."""
    torch.manual_seed(0)
    fsq = FSQ(LEVELS, dim=dim, num_codebooks=2, track_usage=True, backend=backend)
    torch.manual_seed(0)
    plain = FSQ(LEVELS, dim=dim, num_codebooks=2, backend=backend)
    z = torch.randn(3, 2, 9, fsq.dim, generator=torch.Generator().manual_seed(9))
    grads = torch.func.vmap(torch.func.grad(lambda x: fsq(x)[0].sum()))(z)
    expected = torch.func.vmap(torch.func.grad(lambda x: plain(x)[0].sum()))(z)
    torch.testing.assert_close(grads, expected, rtol=0, atol=0)
    _, indices = plain(z.reshape(6, 9, fsq.dim))
    assert torch.equal(fsq.usage_counts, bincounts(indices, 2, 60))


def test_forward_kernel_allocates_no_indices():
    """The launcher passes an empty (0,) int32 tensor where the indices would go; the op's fake implementation
    gives the same shape (torch.compile and export see it)."""
    if not _triton_runs_here():
        pytest.skip("needs the Triton path (a GPU, or TRITON_INTERPRET=1)")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fsq_triton import level_tables, ops

    tables = level_tables([16] * 10, "cpu")
    z = torch.randn(3, 20, 11)
    out, indices = ops.apply_quantize(z, tables.values, tables.integers, 2, False, False)
    assert out.shape == z.shape and indices.shape == (0,) and indices.dtype == torch.int32
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(z)
        out, indices = torch.ops.fsq_triton.quantize(fake, mode.from_tensor(tables.values),
                                                     mode.from_tensor(tables.integers), 2, False, False)
    assert out.shape == z.shape and indices.shape == (0,) and indices.dtype == torch.int32


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_counts_without_indices(compiler):
    """torch.compile(fullgraph=True): the counting op (a mutation of the module's buffer) and the index-free
    forward trace; counts, outputs and gradients as in eager."""
    c = 2
    z = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(7)) * 2
    z[0, 1, 2] = float("nan")
    expected_out, expected_indices = FSQ(LEVELS, num_codebooks=c, backend="torch")(z)
    torch.compiler.reset()
    fsq = FSQ(LEVELS, num_codebooks=c, track_usage=True, return_indices=False)
    compiled = torch.compile(fsq, backend=compiler, fullgraph=True)
    zz = z.clone().requires_grad_(True)
    out, indices = compiled(zz)
    out.nansum().backward()
    with torch.no_grad():
        compiled(z)
    assert indices is None and zz.grad is not None
    assert torch.equal(out.nan_to_num(9.0), expected_out.nan_to_num(9.0))
    assert torch.equal(fsq.usage_counts, 2 * bincounts(expected_indices, c, 60))


# --------------------------------------------------------------------------------------------------
# With projections: the fused projected forward kernel counts in the same pass (no index_add_ after it)
# --------------------------------------------------------------------------------------------------

DIM = 7  # != len(LEVELS) * c: project_in/project_out, fused on the Triton path


def projected_pair(num_codebooks, bias=True, **kwargs):
    """A counting module with projections and an identical one without counting (same parameters)."""
    torch.manual_seed(0)
    counted = FSQ(LEVELS, dim=DIM, num_codebooks=num_codebooks, projection_has_bias=bias, track_usage=True, **kwargs)
    torch.manual_seed(0)
    plain = FSQ(LEVELS, dim=DIM, num_codebooks=num_codebooks, projection_has_bias=bias,
                **{k: v for k, v in kwargs.items() if k != "return_indices"})
    return counted, plain


PROJECTED_INPUTS = [
    pytest.param((2, 9, DIM), False, id="sequence"),
    pytest.param((2, DIM, 3, 5), False, id="image"),
    pytest.param((2, DIM, 11), True, id="channel-first-sequence"),
]


@pytest.mark.parametrize("num_codebooks", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape,channel_first", PROJECTED_INPUTS)
def test_projected_counts_equal_bincount_of_the_returned_indices(shape, channel_first, bias, num_codebooks, backend):
    """Several forwards accumulate (one with NaN tokens, which count nowhere), then reset_usage starts over."""
    c = num_codebooks
    fsq, _ = projected_pair(c, bias, channel_first=channel_first, backend=backend)
    assert fsq.has_projections
    # NaN tokens: a NaN feature makes every channel of its token NaN (project_in mixes them)
    z, expected = check_three_forwards(fsq, shape, c)
    assert expected.sum() > 0
    fsq.reset_usage()
    _, indices = fsq(z)
    assert torch.equal(fsq.usage_counts, bincounts(indices, c, 60))


def test_projected_nan_in_one_codebook_counts_only_the_other(backend):
    """A NaN bias of one channel of codebook 1 makes that codebook's index -1 for every token: codebook 1 counts
    nothing, codebook 0 every token."""
    fsq, _ = projected_pair(2, backend=backend)
    with torch.no_grad():
        fsq.project_in.bias[len(LEVELS) + 1] = float("nan")
    z = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(6))
    _, indices = fsq(z)
    assert (indices[..., 1] == -1).all() and (indices[..., 0] >= 0).all()
    assert torch.equal(fsq.usage_counts, bincounts(indices, 2, 60))
    assert fsq.usage_counts[0].sum() == 18 and fsq.usage_counts[1].sum() == 0


@pytest.mark.parametrize("channel_first", [False, True])
def test_projected_counts_without_returning_indices(channel_first, backend):
    """return_indices=False with track_usage=True and projections: the kernel counts indices it never stores."""
    c = 2
    fsq, plain = projected_pair(c, return_indices=False, channel_first=channel_first, backend=backend)
    z = torch.randn(2, DIM, 13) if channel_first else torch.randn(2, 13, DIM)
    z.view(-1)[5] = float("nan")
    out, indices = fsq(z)
    expected_out, expected_indices = plain(z)
    assert indices is None
    assert torch.equal(out.nan_to_num(9.0), expected_out.nan_to_num(9.0))
    assert (expected_indices == -1).any()
    assert torch.equal(fsq.usage_counts, bincounts(expected_indices, c, 60))
    fsq(z)
    assert torch.equal(fsq.usage_counts, 2 * bincounts(expected_indices, c, 60))


@pytest.mark.parametrize("return_indices", [True, False])
def test_the_projected_triton_forward_counts_in_the_kernel(return_indices, monkeypatch):
    """The fused projected path runs no separate counting pass (``_count_usage`` is not called): its launcher gets
    the module's own buffer, and stores no indices without return_indices."""
    if not _triton_runs_here():
        pytest.skip("needs the Triton path (a GPU, or TRITON_INTERPRET=1)")
    import fsq_triton.ops.autograd as autograd_ops

    fsq, plain = projected_pair(2, return_indices=return_indices, backend="triton")
    buffer = fsq.usage_counts
    launches = []
    real = autograd_ops.forward_projected_triton

    def recording(*args):
        out, indices, h = real(*args)
        launches.append((args[-1], indices.shape))
        return out, indices, h

    def no_pass(indices):
        raise AssertionError("a separate counting pass ran")

    monkeypatch.setattr(autograd_ops, "forward_projected_triton", recording)
    monkeypatch.setattr(fsq, "_count_usage", no_pass)
    z = torch.randn(2, 9, DIM)
    for grad in (False, True):  # the no-autograd fast path and FSQProjectedFunction
        with torch.set_grad_enabled(grad):
            fsq(z)
    assert len(launches) == 2 and all(usage is buffer for usage, _ in launches)
    assert all(shape == ((2, 9, 2) if return_indices else (0,)) for _, shape in launches)
    _, indices = plain(z)
    assert fsq.usage_counts is buffer and torch.equal(buffer, 2 * bincounts(indices, 2, 60))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("return_indices", [True, False])
@pytest.mark.parametrize("channel_first", [False, True])
def test_projected_gradients_unchanged_by_counting(channel_first, return_indices, bias, backend):
    """The gradients of the input and of all projection parameters are exactly those without track_usage."""
    fsq, plain = projected_pair(2, bias, return_indices=return_indices, channel_first=channel_first, backend=backend)
    z = torch.randn(2, DIM, 9) if channel_first else torch.randn(2, 9, DIM)
    z.requires_grad_(True)
    z_plain = z.detach().clone().requires_grad_(True)
    out, _ = fsq(z)
    expected_out, expected_indices = plain(z_plain)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    (expected_out * weights).sum().backward()
    assert torch.equal(out, expected_out)
    assert torch.equal(z.grad, z_plain.grad)
    for (name, p), p_plain in zip(fsq.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, p_plain.grad), name
    assert torch.equal(fsq.usage_counts, bincounts(expected_indices, 2, 60))


def test_projected_counts_across_programs_and_partial_blocks(backend):
    """Several programs and a partial last block (forced 16-token blocks) add into one histogram."""
    from fsq_triton import autotune

    c = 2
    torch.manual_seed(1)
    fsq = FSQ([8, 6, 5], dim=DIM, num_codebooks=c, track_usage=True, backend=backend)
    z = torch.randn(3, 3 * 16 + 5, DIM, generator=torch.Generator().manual_seed(1)) * 3
    z[1, 7, 2] = float("nan")
    with autotune.forced_config({"BLOCK_N": 16, "num_warps": 4}):
        _, indices = fsq(z)
        _, indices_cf = fsq(z.transpose(1, 2).unsqueeze(-1))  # channel-first image, same tokens
    assert torch.equal(indices_cf.reshape(indices.shape), indices)
    assert (indices == -1).any()
    assert torch.equal(fsq.usage_counts, 2 * bincounts(indices, c, 240))


def test_projected_counts_with_64_bit_offsets(monkeypatch):
    """The 64-bit-offset variant of the projected kernel (taken past 2**31 elements; forced here) counts the same."""
    if not _triton_runs_here():
        pytest.skip("needs the Triton path (a GPU, or TRITON_INTERPRET=1)")
    from fsq_triton.ops import fsq_projected

    monkeypatch.setattr(fsq_projected, "_needs_int64", lambda *tensors: True)
    fsq, plain = projected_pair(2, backend="triton")
    z = torch.randn(2, 13, DIM)
    out, indices = fsq(z)
    expected_out, expected_indices = plain(z)
    assert torch.equal(out, expected_out) and torch.equal(indices, expected_indices)
    assert torch.equal(fsq.usage_counts, bincounts(expected_indices, 2, 60))


def test_opcheck_projected_ops_with_counts_and_without_indices():
    """``fsq_triton::quantize_projected_counted`` (mutates ``usage``) and ``quantize_projected`` without indices pass
    torch.library.opcheck (schema, fake implementation, dispatch), and match the PyTorch math."""
    from fsq_triton import level_tables
    from fsq_triton.ops import fsq_projected

    ops = torch.ops.fsq_triton
    tables = level_tables(LEVELS, "cpu")
    gen = torch.Generator().manual_seed(2)
    c, e = 2, 2 * len(LEVELS)
    w_in, b_in = torch.randn(e, DIM, generator=gen), torch.randn(e, generator=gen)
    w_out, b_out = torch.randn(DIM, e, generator=gen), torch.randn(DIM, generator=gen)
    for channels_last in (False, True):
        x = torch.randn(2, 10, DIM, generator=gen).transpose(1, 2) if channels_last else torch.randn(2, DIM, 10, generator=gen)
        args = (x, w_in, b_in, w_out, b_out, tables.values, tables.integers, c, channels_last, False)
        torch.library.opcheck(ops.quantize_projected.default, (*args, False))
        for write_indices in (True, False):
            usage = torch.zeros(c, 60, dtype=torch.int64)
            torch.library.opcheck(ops.quantize_projected_counted.default, (*args, write_indices, usage))
        # (opcheck compares outputs without equal_nan: the NaN token only here)
        x[1, 3, 4] = float("nan")
        _, reference_indices, _ = fsq_projected._quantize_projected_by_tables(*args)
        assert (reference_indices == -1).any()
        for write_indices in (True, False):
            usage = torch.full((c, 60), 3, dtype=torch.int64)  # counts add to what is there
            out, indices, h = ops.quantize_projected_counted(*args, write_indices, usage)
            expected_out, _, _ = ops.quantize_projected(*args)
            assert torch.equal(out.nan_to_num(9.0), expected_out.nan_to_num(9.0)) and h.shape == (0,)
            assert torch.equal(indices, reference_indices) if write_indices else indices.shape == (0,)
            assert torch.equal(usage, bincounts(reference_indices, c, 60) + 3)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("return_indices", [True, False])
def test_torch_compile_counts_with_projections(compiler, return_indices):
    """torch.compile(fullgraph=True) with fused projections: the mutating projected op traces; counts, outputs and
    gradients as in eager."""
    c = 2
    z = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(7)) * 2
    z[0, 1, 2] = float("nan")
    torch.compiler.reset()
    fsq, plain = projected_pair(c, return_indices=return_indices)
    expected_out, expected_indices = plain(z)
    compiled = torch.compile(fsq, backend=compiler, fullgraph=True)
    zz = z.clone().requires_grad_(True)
    out, indices = compiled(zz)
    out.nansum().backward()
    with torch.no_grad():
        compiled(z)
    assert (indices is None) != return_indices and zz.grad is not None
    if return_indices:
        assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(out.nan_to_num(9.0), expected_out.nan_to_num(9.0), rtol=1e-6, atol=1e-6)
    assert torch.equal(fsq.usage_counts, 2 * bincounts(expected_indices, c, 60))


def _triton_runs_here() -> bool:
    from fsq_triton._mode import interpreting

    return gpu_available() or interpreting()


# --------------------------------------------------------------------------------------------------
# GPU: no sync (CUDA's sync debug mode), and counting inside a captured CUDA graph
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_counted_forward_never_syncs():
    fsq = FSQ([8, 5, 5, 5], num_codebooks=2, track_usage=True).cuda()
    without_indices = FSQ([8, 5, 5, 5], num_codebooks=2, track_usage=True, return_indices=False).cuda()
    z = torch.randn(4, 1000, 8, device="cuda")
    fsq(z)  # warm-up: compilation and calibration may sync
    without_indices(z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        _, indices = fsq(z)
        out, none = without_indices(z)
        usage = fsq.codebook_usage()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert none is None and all(t.is_cuda for t in usage.values())
    torch.cuda.synchronize()
    assert torch.equal(fsq.usage_counts.cpu(), 2 * bincounts(indices.cpu(), 2, 1000))
    assert torch.equal(without_indices.usage_counts.cpu(), fsq.usage_counts.cpu())


@pytest.mark.gpu
def test_gpu_counts_inside_a_cuda_graph():
    fsq = FSQ([8, 5, 5, 5], num_codebooks=2, track_usage=True, return_indices=False).cuda()
    reference = FSQ([8, 5, 5, 5], num_codebooks=2).cuda()
    z = torch.randn(4, 1000, 8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fsq(z)  # warm-up on a side stream, as CUDA graph capture asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = fsq(z)
    fsq.reset_usage()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    _, indices = reference(z)
    assert torch.equal(fsq.usage_counts.cpu(), 3 * bincounts(indices.cpu(), 2, 1000))


@pytest.mark.gpu
@pytest.mark.parametrize("return_indices", [True, False])
def test_gpu_compiled_counts_with_cuda_graphs(return_indices):
    """torch.compile(mode="reduce-overhead", fullgraph=True): Inductor's CUDA graphs replay the counting kernel."""
    torch.compiler.reset()
    fsq = FSQ([8, 5, 5, 5], num_codebooks=2, track_usage=True, return_indices=return_indices).cuda()
    compiled = torch.compile(fsq, mode="reduce-overhead", fullgraph=True)
    z = torch.randn(4, 1000, 8, device="cuda")
    for _ in range(4):
        out, indices = compiled(z)
    torch.cuda.synchronize()
    _, expected = FSQ([8, 5, 5, 5], num_codebooks=2).cuda()(z)
    assert (indices is None) != return_indices
    assert torch.equal(fsq.usage_counts.cpu(), 4 * bincounts(expected.cpu(), 2, 1000))
