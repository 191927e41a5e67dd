"""The custom ops ``torch.ops.fsq_triton.*``: opcheck, and the Triton kernels against the PyTorch path.

The ops take the *feature view* ``(b, c*d, n)`` as the module hands it: a channel-first image/video
flattened (``channels_last=False``) or a channel-last sequence transposed (``channels_last=True``).
Under the interpreter the ops run the Triton kernels on CPU tensors; ``fsq_triton.torch_impl`` is the
PyTorch path on the same inputs.
"""

import pytest
import torch

from conftest import assert_bitwise_equal, interpreting, ref_forward

import fsq_triton
from fsq_triton import FSQ, level_tables, torch_impl
from fsq_triton.levels import COL_GRAD_SCALE, COL_SHIFT

ops = torch.ops.fsq_triton

pytestmark = pytest.mark.skipif(not interpreting(), reason="the Triton ops run on CPU tensors only with TRITON_INTERPRET=1")


def feature(b, e, n, channels_last, dtype=torch.float32, generator=None, scale=2.0):
    """A (b, e, n) feature view whose memory is (b, n, e) (channels_last) or (b, e, n) contiguous."""
    shape = (b, n, e) if channels_last else (b, e, n)
    t = (torch.randn(shape, generator=generator) * scale).to(dtype)
    return t.transpose(1, 2) if channels_last else t


def assert_layout(t, channels_last):
    assert (t.transpose(1, 2) if channels_last else t).is_contiguous(), "result not in the requested layout"


# --------------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, autograd registration, AOT dispatch)
# --------------------------------------------------------------------------------------------------

OPCHECK_CONFIGS = [
    pytest.param((8, 5, 5, 5), 1, torch.float32, id="8555-c1-f32"),
    pytest.param((7, 6, 3), 2, torch.bfloat16, id="763-c2-bf16"),
]


@pytest.mark.parametrize("levels,num_codebooks,dtype", OPCHECK_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_quantizer_ops(levels, num_codebooks, dtype, channels_last):
    gen = torch.Generator().manual_seed(0)
    tables = level_tables(levels, "cpu")
    e = num_codebooks * len(levels)
    z = feature(2, e, 13, channels_last, dtype, gen)
    torch.library.opcheck(ops.quantize.default, (z, tables.values, tables.integers, num_codebooks, channels_last))
    # with a gradient: the op's registered autograd
    torch.library.opcheck(
        ops.quantize.default,
        (z.detach().clone().requires_grad_(True), tables.values, tables.integers, num_codebooks, channels_last),
    )
    # without indices (an empty (0,) int32 result), and counting into a usage histogram (a mutating op)
    torch.library.opcheck(ops.quantize.default, (z, tables.values, tables.integers, num_codebooks, channels_last, False))
    size = 1
    for level in levels:
        size *= level
    for write_indices in (True, False):
        usage = torch.zeros(num_codebooks, size, dtype=torch.int64)
        torch.library.opcheck(
            ops.quantize_counted.default,
            (z, tables.values, tables.integers, num_codebooks, channels_last, write_indices, usage),
        )
    grad_out = feature(2, e, 13, channels_last, dtype, gen)
    torch.library.opcheck(ops.quantize_backward.default, (grad_out, z, tables.values, channels_last))
    size = 1
    for level in levels:
        size *= level
    indices = torch.randint(0, size, (2, 13, num_codebooks), generator=gen, dtype=torch.int32)
    torch.library.opcheck(
        ops.indices_to_codes.default, (indices, tables.values, tables.integers, size, channels_last, dtype)
    )


# --------------------------------------------------------------------------------------------------
# Triton kernels == the PyTorch path, on the same inputs
# --------------------------------------------------------------------------------------------------

PARITY_CONFIGS = [
    pytest.param((8, 5, 5, 5), 1, id="8555-c1"),
    pytest.param((8, 5, 5, 5), 2, id="8555-c2"),
    pytest.param((8, 8, 8, 5, 5, 5), 1, id="888555-c1"),
    pytest.param((7, 5, 5, 5, 5), 3, id="75555-c3"),
    pytest.param((2, 3, 4, 5), 1, id="2345-c1"),
    pytest.param((16, 16), 2, id="1616-c2"),
    pytest.param((5,), 1, id="5-c1"),
    pytest.param((65, 3), 1, id="65x3-c1"),  # past the unrolled threshold loop
]


def plant_thresholds(z, tables, num_codebooks, generator):
    """Write every calibrated threshold and its float32 neighbours into channel j of random tokens of z."""
    d = tables.integers.shape[0]
    b, e, n = z.shape
    thresholds = tables.thresholds
    for j in range(d):
        thr = thresholds[j][thresholds[j].isfinite()]
        values = torch.cat([thr, torch.nextafter(thr, torch.tensor(-float("inf"))), torch.nextafter(thr, torch.tensor(float("inf")))])
        for c in range(num_codebooks):
            flat = torch.randperm(b * n, generator=generator)[: min(len(values), b * n)]
            z[flat // n, c * d + j, flat % n] = values[: len(flat)].to(z.dtype)
    return z


@pytest.mark.parametrize("levels,num_codebooks", PARITY_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_op_matches_torch_impl(levels, num_codebooks, channels_last, dtype):
    gen = torch.Generator().manual_seed(sum(levels) + num_codebooks)
    tables = level_tables(levels, "cpu")
    e = num_codebooks * len(levels)
    z = feature(3, e, 50, channels_last, torch.float32, gen)
    z = plant_thresholds(z, tables, num_codebooks, gen).to(dtype)
    z[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])

    out, indices = ops.quantize(z, tables.values, tables.integers, num_codebooks, channels_last)
    ref_out, ref_indices = torch_impl.quantize(z, tables, num_codebooks)
    assert out.shape == z.shape and out.dtype == dtype
    assert_layout(out, channels_last)
    assert indices.shape == (3, 50, num_codebooks) and indices.dtype == torch.int32
    assert_bitwise_equal(out, ref_out, "out")
    assert torch.equal(indices, ref_indices)

    # and both are the reference's math (computed here from scratch)
    math_out, math_idx = ref_forward(z.float().transpose(1, 2), list(levels), num_codebooks, keep_num_codebooks_dim=True)
    assert_bitwise_equal(out, math_out.transpose(1, 2).to(dtype), "out vs reference math")
    assert torch.equal(indices.long(), math_idx)


@pytest.mark.parametrize("levels,num_codebooks", PARITY_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_backward_op_matches_torch_impl(levels, num_codebooks, channels_last, dtype):
    gen = torch.Generator().manual_seed(10 + sum(levels))
    tables = level_tables(levels, "cpu")
    e = num_codebooks * len(levels)
    z = feature(2, e, 40, channels_last, dtype, gen)
    z[0, 0, :2] = torch.tensor([float("inf"), -float("inf")])
    grad_out = feature(2, e, 40, not channels_last, dtype, gen)  # the other layout: any strides work

    grad = ops.quantize_backward(grad_out, z, tables.values, channels_last)
    shift, grad_scale = tables.values[:, COL_SHIFT], tables.values[:, COL_GRAD_SCALE]
    expected = torch_impl.quantize_backward(grad_out, z, shift, grad_scale)
    assert grad.shape == z.shape and grad.dtype == dtype
    assert_layout(grad, channels_last)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, expected, **tol)

    # the straight-through gradient of autograd through the PyTorch path, and the op's own autograd
    zz = z.detach().float().requires_grad_(True)
    out, _ = torch_impl.quantize(zz, tables, num_codebooks)
    (autograd_grad,) = torch.autograd.grad(out, zz, grad_out.float())
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.float(), autograd_grad, **tol)
    zo = z.detach().clone().requires_grad_(True)
    out, _ = ops.quantize(zo, tables.values, tables.integers, num_codebooks, channels_last)
    (op_grad,) = torch.autograd.grad(out, zo, grad_out)
    assert_bitwise_equal(op_grad, grad, "the op's registered gradient")


@pytest.mark.parametrize("levels,num_codebooks", PARITY_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_indices_to_codes_op_matches_torch_impl(levels, num_codebooks, channels_last, dtype, index_dtype):
    gen = torch.Generator().manual_seed(20 + sum(levels))
    tables = level_tables(levels, "cpu")
    size = 1
    for level in levels:
        size *= level
    indices = torch.randint(0, size, (2, 30, num_codebooks), generator=gen).to(index_dtype)
    indices[0, 0, 0], indices[0, 1, 0] = 0, size - 1
    indices[1, 0, 0], indices[1, 1, -1] = -1, size  # out of range: NaN codes for those tokens
    codes = ops.indices_to_codes(indices, tables.values, tables.integers, size, channels_last, dtype)
    expected = torch_impl.indices_to_codes(indices, tables, size, dtype)
    assert codes.shape == (2, num_codebooks * len(levels), 30) and codes.dtype == dtype
    assert_layout(codes, channels_last)
    assert_bitwise_equal(codes, expected, "codes")
    d = len(levels)
    assert codes[1, :d, 0].isnan().all() and codes[1, -d:, 1].isnan().all()
    assert not codes[0].isnan().any()


@pytest.mark.parametrize("block_n", [16, 32, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_blocks_and_tails(block_n, channels_last):
    """Several programs per row and a partial last block (forced launch configurations)."""
    from fsq_triton import autotune

    levels, c = (8, 6, 5), 2
    tables = level_tables(levels, "cpu")
    gen = torch.Generator().manual_seed(block_n)
    z = feature(3, c * len(levels), 3 * block_n + 5, channels_last, torch.float32, gen)
    grad_out = torch.randn(z.shape, generator=gen)
    size = 8 * 6 * 5
    indices_in = torch.randint(0, size, (3, 3 * block_n + 5, c), generator=gen)
    with autotune.forced_config({"BLOCK_N": block_n, "num_warps": 4}):
        out, indices = ops.quantize(z, tables.values, tables.integers, c, channels_last)
        grad = ops.quantize_backward(grad_out, z, tables.values, channels_last)
        codes = ops.indices_to_codes(indices_in, tables.values, tables.integers, size, channels_last, torch.float32)
    ref_out, ref_idx = torch_impl.quantize(z, tables, c)
    assert_bitwise_equal(out, ref_out, "out")
    assert torch.equal(indices, ref_idx)
    expected = torch_impl.quantize_backward(grad_out, z, tables.values[:, COL_SHIFT], tables.values[:, COL_GRAD_SCALE])
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    assert_bitwise_equal(codes, torch_impl.indices_to_codes(indices_in, tables, size), "codes")


@pytest.mark.parametrize("channels_last", [False, True])
def test_quantize_flags_match_torch_impl(channels_last):
    """``write_indices=False`` (no index reduced or stored: an empty (0,) result) and ``quantize_counted`` (the kernel
    adds each token's code to the histogram in place) against the PyTorch path, with NaN tokens."""
    levels, c = (8, 5, 3), 2
    tables = level_tables(levels, "cpu")
    gen = torch.Generator().manual_seed(5)
    z = feature(2, c * len(levels), 37, channels_last, torch.float32, gen)
    z[0, 1, 3] = z[1, 4, 0] = float("nan")
    ref_out, ref_idx = torch_impl.quantize(z, tables, c)
    out, indices = ops.quantize(z, tables.values, tables.integers, c, channels_last, False)
    assert_bitwise_equal(out, ref_out, "out")
    assert indices.shape == (0,) and indices.dtype == torch.int32
    assert_layout(out, channels_last)
    expected = torch.stack([torch.bincount(ref_idx[..., k][ref_idx[..., k] >= 0].long(), minlength=120) for k in range(c)])
    for write_indices in (True, False):
        usage = torch.full((c, 120), 3, dtype=torch.int64)  # counts add to what is there
        out, indices = ops.quantize_counted(z, tables.values, tables.integers, c, channels_last, write_indices, usage)
        assert_bitwise_equal(out, ref_out, "out")
        assert torch.equal(indices, ref_idx) if write_indices else indices.shape == (0,)
        assert torch.equal(usage, expected + 3)


def test_ops_do_not_alias_or_mutate_inputs():
    levels = (8, 5, 5, 5)
    tables = level_tables(levels, "cpu")
    values, integers = tables.values.clone(), tables.integers.clone()
    z = torch.randn(2, 4, 9)
    z_copy = z.clone()
    out, indices = ops.quantize(z, tables.values, tables.integers, 1, False)
    grad = ops.quantize_backward(z, z, tables.values, False)
    assert torch.equal(z, z_copy)
    assert torch.equal(tables.values.nan_to_num(), values.nan_to_num()) and torch.equal(tables.integers, integers)
    for result in (out, grad):
        assert result.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------------
# The module's Triton path == its PyTorch path (backend="triton" vs backend="torch")
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "levels,dim,num_codebooks,shape",
    [
        pytest.param([8, 5, 5, 5], None, 1, (2, 4, 6, 7), id="image"),
        pytest.param([8, 8, 8, 5, 5, 5], None, 1, (1, 6, 3, 4, 5), id="video"),
        pytest.param([8, 5, 5, 5], None, 2, (3, 21, 8), id="sequence-c2"),
        pytest.param([8, 6, 5], 24, 1, (2, 17, 24), id="sequence-projection"),
        pytest.param([8, 6, 5], 24, 2, (2, 24, 3, 5), id="image-projection-c2"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_backends_agree(levels, dim, num_codebooks, shape, dtype):
    torch.manual_seed(30)
    ours = FSQ(levels, dim=dim, num_codebooks=num_codebooks, backend="triton").to(dtype)
    ref = FSQ(levels, dim=dim, num_codebooks=num_codebooks, backend="torch").to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(31)
    z = (torch.randn(shape, generator=gen) * 2).to(dtype)
    grad_out = torch.randn(shape, generator=gen).to(dtype)

    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out, indices = ours(z1)
    ref_out, ref_indices = ref(z2)
    assert torch.equal(indices, ref_indices)
    projected = dim is not None
    if projected:  # fused projections accumulate in another order: close, not bitwise
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(out, ref_out, **tol)
    else:
        assert_bitwise_equal(out, ref_out, "out")
    out.backward(grad_out)
    ref_out.backward(grad_out)

    def close(a, b, msg):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=msg)
        else:  # half-precision sums with cancellation: tolerance relative to the tensor's scale
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()), msg=msg)

    close(z1.grad, z2.grad, "grad z")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, ref_params[name].grad, name)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    with torch.no_grad():
        for project_out in (True, False):
            codes = ours.indices_to_codes(indices, project_out=project_out)
            ref_codes = ref.indices_to_codes(indices, project_out=project_out)
            assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
            if projected and project_out:
                torch.testing.assert_close(codes, ref_codes, **tol)
            else:
                assert_bitwise_equal(codes, ref_codes, f"decode project_out={project_out}")


@pytest.mark.parametrize(
    "levels,dim,num_codebooks",
    [([8, 5], 1, 1), ([5], 4, 1), ([8, 5, 5], 3, 1), ([8, 5, 5, 5], 100, 1), ([7, 5], 130, 3), ([8, 5, 5, 5], 200, 4),
     ([1000, 3], 9, 1), ([2], 5, 1)],
)
@pytest.mark.parametrize("shape_kind", ["seq", "image"])
def test_projection_shapes_backends_agree(levels, dim, num_codebooks, shape_kind):
    """The fused projection kernels' masking: feature counts that are no multiple of the tile, tiny and odd codebooks."""
    torch.manual_seed(dim)
    ours = FSQ(levels, dim=dim, num_codebooks=num_codebooks, backend="triton")
    ref = FSQ(levels, dim=dim, num_codebooks=num_codebooks, backend="torch")
    ref.load_state_dict(ours.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(dim + 1)
    z = torch.randn((3, 37, dim) if shape_kind == "seq" else (2, dim, 5, 7), generator=gen) * 2
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out, indices = ours(z1)
    ref_out, ref_indices = ref(z2)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    ref_out.backward(grad_out)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(ours.indices_to_codes(indices), ref.indices_to_codes(indices), rtol=0, atol=1e-5)


def test_package_exports():
    assert fsq_triton.FSQ is FSQ
    assert issubclass(fsq_triton.BackendUnavailableError, RuntimeError)
    assert set(fsq_triton.BACKENDS) == {"auto", "triton", "torch"}
