"""Inputs at the edges: bad arguments, empty tensors, NaN and infinities, strides, dtypes, huge codebooks."""

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    assert_bitwise_equal,
    ref_constants,
    ref_forward,
    ref_grad_tokens,
    ref_indices_to_codes,
    ref_quantize_tokens,
)

import fsq_triton
from fsq_triton import FSQ, BackendUnavailableError

LEVELS = [8, 5, 5, 5]


# --------------------------------------------------------------------------------------------------
# Bad constructor arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        (dict(levels=[]), ValueError, "levels"),
        (dict(levels=()), ValueError, "levels"),
        (dict(levels=[8, 1]), ValueError, "levels"),
        (dict(levels=[0]), ValueError, "levels"),
        (dict(levels=[5, -3]), ValueError, "levels"),
        (dict(levels=[8, 2.5]), TypeError, "levels"),
        (dict(levels=[8.0, 5]), TypeError, "levels"),
        (dict(levels=[8, "8"]), TypeError, "levels"),
        (dict(levels=[True, 5]), TypeError, "levels"),
        (dict(levels="885"), TypeError, "levels"),
        (dict(levels=8), TypeError, "levels"),
        (dict(levels=torch.tensor([8.0, 5.0])), TypeError, "levels"),
        (dict(levels=[1000, 1000, 1000, 3]), ValueError, "levels"),  # 3e9 codes: beyond int32
        (dict(levels=[2**16, 2**16]), ValueError, "levels"),
        (dict(levels=[5000]), ValueError, "level"),  # the tanh bound escapes the L levels
        (dict(levels=LEVELS, num_codebooks=0), ValueError, "num_codebooks"),
        (dict(levels=LEVELS, num_codebooks=-1), ValueError, "num_codebooks"),
        (dict(levels=LEVELS, num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
        (dict(levels=LEVELS, dim=0), ValueError, "dim"),
        (dict(levels=LEVELS, backend="cuda"), ValueError, "backend"),
        (dict(levels=LEVELS, backend="Triton"), ValueError, "backend"),
        (dict(levels=LEVELS, backend=None), ValueError, "backend"),
    ],
)
def test_constructor_rejects(kwargs, error, fragment):
    levels = kwargs.pop("levels")
    with pytest.raises(error, match=fragment):
        FSQ(levels, **kwargs)


def test_constructor_accepts_edges():
    # the largest codebooks that fit int32, and integer types other than int
    m = FSQ([1000, 1000, 1000, 2])
    assert m.codebook_size == 2 * 10**9
    assert FSQ((8, 5, 5)).levels == (8, 5, 5)
    assert FSQ(torch.tensor([8, 5, 5])).codebook_size == 200
    assert FSQ([2]).codebook_size == 2
    m = FSQ(LEVELS, num_codebooks=1, keep_num_codebooks_dim=True, scale=0.5)
    assert m.keep_num_codebooks_dim is True and m.scale == 0.5


# --------------------------------------------------------------------------------------------------
# Bad call arguments (both backends)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "z,error,fragment",
    [
        (torch.randn(2, 10, 5), ValueError, "channels"),  # sequence with 5 channels, dim 4
        (torch.randn(2, 5, 4, 4), ValueError, "channels"),  # image with 5 channels
        (torch.randn(2, 4, 5, 5, 3), ValueError, "channels"),  # video with 5 channels... dim 1 is 4 here: see below
        (torch.randn(10, 4), ValueError, "z"),
        (torch.randn(4), ValueError, "z"),
        (torch.randn(()), ValueError, "z"),
        (torch.ones(2, 10, 4, dtype=torch.int32), TypeError, "z"),
        (torch.ones(2, 10, 4, dtype=torch.int64), TypeError, "z"),
        (torch.ones(2, 10, 4, dtype=torch.bool), TypeError, "z"),
        (torch.ones(2, 10, 4, dtype=torch.complex64), TypeError, "z"),
        ([[[0.0, 0.0, 0.0, 0.0]]], TypeError, "z"),
        (None, TypeError, "z"),
    ],
    ids=lambda v: None if not isinstance(v, torch.Tensor) else f"{v.dtype}-{tuple(v.shape)}",
)
def test_forward_rejects(z, error, fragment, backend):
    m = FSQ(LEVELS, backend=backend)
    if isinstance(z, torch.Tensor) and z.ndim == 5:
        z = z.transpose(1, 3)  # (2, 5, 5, 4, 3): 5 channels at dim 1
    with pytest.raises(error, match=fragment):
        m(z)


def test_forward_rejects_wrong_channels_with_projection(backend):
    m = FSQ(LEVELS, dim=16, backend=backend)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 4, 3, 3))


def test_indices_to_codes_rejects(backend):
    m = FSQ(LEVELS, backend=backend)
    for bad in (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="indices"):
            m.indices_to_codes(bad)
    with pytest.raises(TypeError, match="indices"):
        m.indices_to_codes([[0, 1]])
    for bad_value in (-1, m.codebook_size, m.codebook_size + 7, 2**40):
        indices = torch.zeros(2, 3, dtype=torch.int64)
        indices[1, 2] = bad_value
        with pytest.raises(IndexError, match="indices"):
            m.indices_to_codes(indices)
        with pytest.raises(IndexError, match="indices"):
            m.indices_to_codes(indices, project_out=False)
    # the top index is fine
    m.indices_to_codes(torch.full((2, 3), m.codebook_size - 1))


def test_indices_to_codes_rejects_wrong_codebook_axis(backend):
    m = FSQ(LEVELS, num_codebooks=2, backend=backend)
    with pytest.raises(ValueError, match="indices"):
        m.indices_to_codes(torch.zeros(2, 5, 3, dtype=torch.int32))


def test_quantize_and_codes_to_indices_reject(backend):
    m = FSQ(LEVELS, backend=backend)
    with pytest.raises(ValueError, match="z"):
        m.quantize(torch.randn(3, 5))
    with pytest.raises(TypeError, match="z"):
        m.quantize(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="zhat"):
        m.codes_to_indices(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="zhat"):
        m.codes_to_indices(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="z"):
        m.bound(torch.zeros(3, 4, dtype=torch.int64))


def test_triton_backend_unavailable(monkeypatch):
    """backend='triton' on a CPU tensor without the interpreter: a clear error, from every entry point."""
    assert issubclass(BackendUnavailableError, RuntimeError)
    assert issubclass(BackendUnavailableError, ValueError)
    m = FSQ(LEVELS, backend="triton")
    auto = FSQ(LEVELS, backend="auto")
    z = torch.randn(2, 10, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend"):
        m(z)
    with pytest.raises(BackendUnavailableError, match="backend"):
        m(torch.randn(2, 4, 3, 3))
    with pytest.raises(BackendUnavailableError, match="backend"):
        m.quantize(torch.randn(7, 4))
    with pytest.raises(BackendUnavailableError, match="backend"):
        m.indices_to_codes(torch.zeros(2, 5, dtype=torch.int64))
    # "auto" falls back to the PyTorch path there
    out, indices = auto(z)
    ref_out, ref_idx = ref_forward(z, LEVELS)
    assert torch.equal(indices, ref_idx.to(torch.int32))
    assert torch.equal(out, ref_out)


# --------------------------------------------------------------------------------------------------
# Empty inputs
# --------------------------------------------------------------------------------------------------


EMPTY_CASES = [
    ((0, 10, 4), None, 1),
    ((3, 0, 4), None, 1),
    ((0, 4, 5, 5), None, 1),
    ((2, 4, 0, 5), None, 1),
    ((2, 4, 3, 0, 5), None, 1),
    ((0, 4, 3, 2, 5), None, 1),
    ((2, 0, 8), None, 2),
    ((0, 8, 3, 3), None, 2),
    ((0, 10, 16), 16, 1),
    ((0, 16, 3, 3), 16, 1),
    ((2, 16, 0, 4), 16, 2),
]


def _empty_id(case):
    shape, dim, nc = case
    return f"{'x'.join(map(str, shape))}-dim{dim}-c{nc}"


@pytest.mark.parametrize("case", EMPTY_CASES, ids=_empty_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_inputs(case, dtype, backend):
    shape, dim, num_codebooks = case
    m = FSQ(LEVELS, dim=dim, num_codebooks=num_codebooks, backend=backend)
    z = torch.randn(shape, dtype=dtype, requires_grad=True)
    out, indices = m(z)
    channel_first = len(shape) >= 4
    token_shape = (shape[0], *shape[2:]) if channel_first else shape[:2]
    expected_idx_shape = token_shape + ((num_codebooks,) if m.keep_num_codebooks_dim else ())
    assert out.shape == z.shape and out.dtype == dtype
    assert indices.shape == expected_idx_shape and indices.dtype == torch.int32
    out.sum().backward()
    assert z.grad.shape == z.shape and z.grad.dtype == dtype


@pytest.mark.parametrize("case", EMPTY_CASES, ids=_empty_id)
def test_empty_indices_to_codes(case, backend):
    """Decoding empty indices gives empty codes of the reference's shape (it handles batch 0 too)."""
    shape, dim, num_codebooks = case
    m = FSQ(LEVELS, dim=dim, num_codebooks=num_codebooks, backend=backend)
    channel_first = len(shape) >= 4
    token_shape = (shape[0], *shape[2:]) if channel_first else shape[:2]
    indices = torch.zeros(token_shape + ((num_codebooks,) if m.keep_num_codebooks_dim else ()), dtype=torch.int32)
    codes = m.indices_to_codes(indices)
    assert codes.shape == shape and codes.dtype == torch.float32
    codes = m.indices_to_codes(indices, project_out=False)
    e = m.effective_codebook_dim
    assert codes.shape == ((shape[0], e, *shape[2:]) if channel_first else (*shape[:2], e))


# --------------------------------------------------------------------------------------------------
# NaN and infinities
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_kind", ["seq", "image", "video"])
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_nan_inputs(shape_kind, num_codebooks, backend):
    d = len(LEVELS)
    e = d * num_codebooks
    gen = torch.Generator().manual_seed(11)
    shape = {"seq": (3, 40, e), "image": (2, e, 6, 7), "video": (2, e, 3, 4, 5)}[shape_kind]
    z = torch.randn(shape, generator=gen) * 2
    nan_mask = torch.rand(shape, generator=gen) < 0.05
    z[nan_mask] = float("nan")
    assert nan_mask.any()

    m = FSQ(LEVELS, num_codebooks=num_codebooks, backend=backend)
    out, indices = m(z)
    ref_out, ref_idx = ref_forward(z, LEVELS, num_codebooks)

    assert torch.equal(out.isnan(), nan_mask), "NaN in out exactly where the input is NaN"
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)

    # the token (of one codebook) is -1 exactly when one of its channels is NaN
    tokens = z.movedim(1, -1) if z.ndim >= 4 else z
    token_nan = tokens.reshape(*tokens.shape[:-1], num_codebooks, d).isnan().any(-1)
    if not m.keep_num_codebooks_dim:
        token_nan = token_nan.squeeze(-1)
    assert torch.equal(indices == -1, token_nan)
    assert torch.equal(indices, ref_idx.to(torch.int32))
    assert (indices[~token_nan] >= 0).all()


def test_nan_with_projection(backend):
    """Through project_in, a NaN reaches every channel of its token: the token's out is NaN, its index -1."""
    m = FSQ(LEVELS, dim=12, backend=backend)
    z = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(3))
    z[1, 4, 7] = float("nan")
    out, indices = m(z)
    assert out[1, 4].isnan().all()
    assert indices[1, 4] == -1
    others = torch.ones(2, 9, dtype=torch.bool)
    others[1, 4] = False
    assert not out[others].isnan().any()
    assert (indices[others] >= 0).all()


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4, 5], [7, 6], [16, 16, 3]])
def test_infinities_saturate(levels, backend):
    d = len(levels)
    m = FSQ(levels, backend=backend)
    lv, _, _, _, half_width = ref_constants(levels)
    bottom = -torch.ones(d)
    top = (lv - 1 - half_width).float() / half_width.float()

    z = torch.empty(2, 3, d)
    z[0] = float("inf")
    z[1] = -float("inf")
    z = z.requires_grad_(True)
    out, indices = m(z)
    assert torch.equal(out[0], top.expand(3, d))
    assert torch.equal(out[1], bottom.expand(3, d))
    assert (indices[0] == m.codebook_size - 1).all()
    assert (indices[1] == 0).all()
    out.backward(torch.ones_like(out))
    assert torch.equal(z.grad, torch.zeros_like(z))  # the tanh bound is flat at infinity

    # mixed with finite values, each channel saturates independently; the reference math agrees
    gen = torch.Generator().manual_seed(sum(levels))
    z = torch.randn(4, 30, d, generator=gen) * 3
    pick = torch.rand(z.shape, generator=gen)
    pick[0, 0] = torch.tensor([0.1, 0.9] * d)[:d]  # one token alternating +inf, -inf
    z[pick < 0.2] = float("inf")
    z[pick > 0.8] = -float("inf")
    out, indices = m(z)
    ref_out, ref_idx = ref_forward(z, levels)
    assert_bitwise_equal(out, ref_out, "out")
    assert torch.equal(indices, ref_idx.to(torch.int32))
    assert torch.equal(out[pick < 0.2], top.expand_as(z)[pick < 0.2])
    assert torch.equal(out[pick > 0.8], bottom.expand_as(z)[pick > 0.8])


def test_large_finite_magnitudes_and_signed_zeros(backend):
    levels = [8, 8, 8, 6, 5]
    m = FSQ(levels, backend=backend)
    values = torch.tensor([3.4e38, -3.4e38, 1e4, -1e4, 0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45])
    z = values[torch.randint(len(values), (3, 20, len(levels)), generator=torch.Generator().manual_seed(5))]
    out, indices = m(z)
    ref_out, ref_idx = ref_forward(z, levels)
    assert_bitwise_equal(out, ref_out, "out")  # the zero code is +0.0, as in the reference
    assert torch.equal(indices, ref_idx.to(torch.int32))


# --------------------------------------------------------------------------------------------------
# Strides and memory formats: the same numbers as the contiguous copy
# --------------------------------------------------------------------------------------------------


def _noncontiguous_inputs(gen):
    e = 8  # two codebooks of LEVELS, or one of 8 channels
    seq = torch.randn(20, 3, e, generator=gen) * 2
    wide = torch.randn(3, 20, 2 * e, generator=gen) * 2
    img = torch.randn(2, e, 6, 7, generator=gen) * 2
    vid = torch.randn(2, e, 3, 4, 5, generator=gen) * 2
    return {
        "seq-transposed": seq.transpose(0, 1),
        "seq-sliced": wide[:, :, 1::2],
        "seq-reversed-tokens": wide[:, :, :e].flip(1)[:, ::2],
        "seq-expanded-batch": seq[:1].expand(4, -1, -1),
        "seq-expanded-tokens": seq[:, :1].expand(-1, 9, -1).transpose(0, 1)[:3],
        "image-channels-last": img.contiguous(memory_format=torch.channels_last),
        "image-transposed-hw": img.transpose(2, 3),
        "image-sliced": img[:, :, 1::2, ::3],
        "image-expanded": img[:, :, :1, :].expand(-1, -1, 5, -1),
        "video-channels-last-3d": vid.contiguous(memory_format=torch.channels_last_3d),
        "video-permuted": vid.permute(0, 1, 4, 3, 2),
        "video-sliced-batch": torch.cat([vid, vid])[::2],
    }


NONCONTIG_NAMES = list(_noncontiguous_inputs(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", NONCONTIG_NAMES)
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_noncontiguous_inputs_match_contiguous(name, num_codebooks, backend):
    z = _noncontiguous_inputs(torch.Generator().manual_seed(1))[name]
    if name.endswith("channels-last") or name.endswith("channels-last-3d"):
        assert z.is_contiguous(memory_format=torch.channels_last if z.ndim == 4 else torch.channels_last_3d)
    assert not z.is_contiguous()
    levels = LEVELS if num_codebooks == 2 else [8, 5, 5, 5, 4, 4, 3, 3]
    m = FSQ(levels, num_codebooks=num_codebooks, backend=backend)
    zc = z.contiguous()

    z = z.detach().requires_grad_(True)  # a leaf with z's strides
    zc = zc.requires_grad_(True)
    out, indices = m(z)
    out_c, indices_c = m(zc)
    assert_bitwise_equal(out, out_c, "out")
    assert torch.equal(indices, indices_c)
    ref_out, ref_idx = ref_forward(zc.detach(), levels, num_codebooks)
    assert_bitwise_equal(out, ref_out, "out vs reference")
    assert torch.equal(indices, ref_idx.to(torch.int32))

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad(out, z, grad)
    (g_c,) = torch.autograd.grad(out_c, zc, grad)
    assert_bitwise_equal(g, g_c, "grad")


@pytest.mark.parametrize("dim", [None, 12])
def test_noncontiguous_grad_out(dim, backend):
    """A broadcast (stride 0) or transposed upstream gradient gives the same input gradient."""
    torch.manual_seed(4)
    m = FSQ(LEVELS, dim=dim, backend=backend)
    gen = torch.Generator().manual_seed(4)
    for z0 in (torch.randn(3, 10, m.dim, generator=gen), torch.randn(2, m.dim, 5, 6, generator=gen)):
        z = z0.clone().requires_grad_(True)
        out, _ = m(z)
        (g_sum,) = torch.autograd.grad(out.sum(), z)  # grad_out is an expanded scalar
        (g_ones,) = torch.autograd.grad(m(z)[0], z, torch.ones(out.shape))
        assert_bitwise_equal(g_sum, g_ones, "expanded grad_out")
        gt = torch.randn(tuple(reversed(out.shape)), generator=gen).permute(*reversed(range(out.ndim)))
        (g_t,) = torch.autograd.grad(m(z)[0], z, gt)
        (g_tc,) = torch.autograd.grad(m(z)[0], z, gt.contiguous())
        assert_bitwise_equal(g_t, g_tc, "transposed grad_out")


# --------------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape_kind", ["seq", "image", "video"])
@pytest.mark.parametrize("levels", [[8, 8, 8, 5, 5, 5], [7, 6, 5, 3, 3, 9]], ids=["888555", "765339"])
def test_half_precision_inputs(dtype, shape_kind, levels, backend):
    """Codes such as 1/3 (levels 6, 7, 9) are not representable in half precision: out is the float32 code
    rounded to nearest, as ``reference_out.to(dtype)``."""
    e = len(levels)
    gen = torch.Generator().manual_seed(6)
    shape = {"seq": (3, 30, e), "image": (2, e, 5, 6), "video": (2, e, 2, 3, 4)}[shape_kind]
    z = (torch.randn(shape, generator=gen) * 2).to(dtype).requires_grad_(True)
    m = FSQ(levels, backend=backend)
    out, indices = m(z)
    ref_out, ref_idx = ref_forward(z.detach().float(), levels)
    assert out.dtype == dtype
    assert_bitwise_equal(out, ref_out.to(dtype), "out")
    assert torch.equal(indices, ref_idx.to(torch.int32))

    grad = torch.randn(shape, generator=gen).to(dtype)
    out.backward(grad)
    assert z.grad.dtype == dtype
    tokens = lambda t: t.movedim(1, -1) if t.ndim >= 4 else t  # noqa: E731
    expected = ref_grad_tokens(tokens(z.detach()), tokens(grad), levels)
    torch.testing.assert_close(tokens(z.grad).double(), expected, rtol=2e-2, atol=2e-2)


def test_float64_input_uses_float32_math(backend):
    """float64 in, float64 out, quantized as float32: values just below a float32 threshold round up to it."""
    levels = [8, 5, 5, 5]
    m = FSQ(levels, backend=backend)
    thresholds = fsq_triton.level_tables(tuple(levels), "cpu").thresholds
    finite = thresholds.isfinite()
    t = thresholds.double()
    # a quarter ulp below the float32 threshold: float32(z) is the threshold itself
    below = t - (t.abs() * 2.0**-26).clamp_min(1e-45)
    assert torch.equal(below[finite].float(), thresholds[finite])
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(2, 60, len(levels), generator=gen, dtype=torch.float64)
    for j in range(len(levels)):
        vals = below[j][finite[j]]
        z[0, : len(vals), j] = vals
        z[1, : len(vals), j] = t[j][finite[j]]
    z = z.requires_grad_(True)
    out, indices = m(z)
    assert out.dtype == torch.float64
    ref_out, ref_idx = ref_forward(z.detach().float(), levels)
    assert_bitwise_equal(out, ref_out.double(), "out")
    assert torch.equal(indices, ref_idx.to(torch.int32))
    out.backward(torch.ones_like(out))
    assert z.grad.dtype == torch.float64
    torch.testing.assert_close(z.grad, ref_grad_tokens(z.detach(), torch.ones_like(z), levels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_projections_in_other_dtypes(dtype, backend):
    """A module cast to another dtype (projection weights included) runs in it and returns that dtype.

    The projections may be fused into the quantizer (accumulating in float32), so ``out`` is compared
    with ``nn.Linear`` in that dtype within a dtype-appropriate tolerance; the indices are exact.
    """
    levels = [8, 5, 5]
    torch.manual_seed(9)
    m = FSQ(levels, dim=10, backend=backend).to(dtype)
    z = torch.randn(4, 250, 10).to(dtype)
    out, indices = m(z)
    assert out.dtype == dtype and out.shape == z.shape
    x = F.linear(z, m.project_in.weight, m.project_in.bias)
    codes, _, idx = ref_quantize_tokens(x, levels)
    expected = F.linear(codes.to(dtype), m.project_out.weight, m.project_out.bias)
    mismatches = (indices != idx.to(torch.int32)).sum().item()
    assert mismatches == 0, f"{mismatches} of {indices.numel()} indices differ from nn.Linear -> FSQ"
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, expected, **tol)
    decoded = m.indices_to_codes(indices)
    assert decoded.dtype == dtype and decoded.shape == z.shape
    torch.testing.assert_close(decoded, expected, **tol)


# --------------------------------------------------------------------------------------------------
# Huge codebooks and the lazily built implicit codebook
# --------------------------------------------------------------------------------------------------


def test_huge_levels_do_not_materialise_codebook(backend):
    levels = [1000, 1000, 1000]
    m = FSQ(levels, backend=backend)
    assert m._buffers["implicit_codebook"] is None
    assert m.codebook_size == 10**9
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(2, 25, 3, generator=gen) * 3
    z[0, 0] = float("inf")
    z[0, 1] = -float("inf")
    out, indices = m(z)
    ref_out, ref_idx = ref_forward(z, levels)
    assert_bitwise_equal(out, ref_out, "out")
    assert torch.equal(indices, ref_idx.to(torch.int32))
    assert indices[0, 0] == m.codebook_size - 1 and indices[0, 1] == 0
    assert torch.equal(m.indices_to_codes(indices), ref_out)
    assert m._buffers["implicit_codebook"] is None, "forward and decode must not build the codebook"


def test_implicit_codebook_lazy_and_eager():
    eager = FSQ([32, 32, 32, 32])  # 2**20 codes x 4 channels = 2**22 floats: built at construction
    assert eager._buffers["implicit_codebook"] is not None
    lazy = FSQ([33, 32, 32, 32])
    assert lazy._buffers["implicit_codebook"] is None
    book = lazy.implicit_codebook
    assert lazy._buffers["implicit_codebook"] is book
    expected = ref_indices_to_codes(torch.arange(lazy.codebook_size), [33, 32, 32, 32])
    assert torch.equal(book, expected)
    assert "implicit_codebook" not in lazy.state_dict()
    assert torch.equal(eager.implicit_codebook, ref_indices_to_codes(torch.arange(2**20), [32] * 4))


@pytest.mark.parametrize("levels", [[32, 32, 32, 32], [33, 32, 32, 32]], ids=["eager", "lazy"])
def test_implicit_codebook_follows_module_dtype(levels):
    """Like any float buffer, the implicit codebook follows ``module.to(dtype)``, whether built eagerly or lazily."""
    m = FSQ(levels).double()
    assert m.implicit_codebook.dtype == torch.float64
    m = FSQ(levels).to(torch.bfloat16)
    assert m.implicit_codebook.dtype == torch.bfloat16


def test_bound_is_the_reference_formula():
    levels = [8, 5, 6, 7]
    m = FSQ(levels)
    z = torch.randn(3, 11, 4, generator=torch.Generator().manual_seed(12)) * 2
    for eps in (1e-3, 0.1):
        lv = torch.tensor(levels, dtype=torch.int32)
        half_l = (lv - 1) * (1 + eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        expected = (z + shift).tanh() * half_l - offset
        got = m.bound(z) if eps == 1e-3 else m.bound(z, eps=eps)
        assert_bitwise_equal(got, expected, f"bound eps={eps}")
