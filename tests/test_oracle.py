"""Parity with ``vector_quantize_pytorch.FSQ`` (default options), the oracle named by docs/semantics.md, on random inputs."""

import itertools
import zlib

import pytest
import torch

from conftest import random_grid_codes

from fsq_triton import FSQ

vqp = pytest.importorskip("vector_quantize_pytorch")

# vector_quantize_pytorch refuses levels containing 2 (without preserve_symmetry)
LEVEL_SETS = [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5], [7, 5, 5, 5, 5], [4, 4, 4], [3, 5, 7], [16, 16], [6]]
SHAPES = ["seq", "image", "video"]


def make_pair(levels, num_codebooks, projection, backend, seed):
    """(oracle, ours) with the oracle's (seeded) projection weights loaded into ours, strict."""
    effective = len(levels) * num_codebooks
    dim = effective + 3 if projection else None
    torch.manual_seed(seed)
    oracle = vqp.FSQ(levels=levels, dim=dim, num_codebooks=num_codebooks)
    ours = FSQ(levels, dim=dim, num_codebooks=num_codebooks, backend=backend)
    ours.load_state_dict(oracle.state_dict(), strict=True)
    assert ours.has_projections == projection == oracle.has_projections
    return oracle, ours


def make_input(shape_kind, dim, strided, generator):
    """A leaf ``base`` (requires grad) and the input ``z``: base itself, or a strided view of it."""
    sizes = {"seq": (2, 24), "image": (2, 6, 5), "video": (2, 3, 4, 5)}[shape_kind]
    b, *rest = sizes
    if shape_kind == "seq":
        if strided:  # every other feature of a wider tensor
            base = torch.randn(b, *rest, 2 * dim, generator=generator) * 2
            return base, lambda t: t[..., ::2]
        base = torch.randn(b, *rest, dim, generator=generator) * 2
        return base, lambda t: t
    if strided:  # a channel-last tensor permuted to channel-first, sliced along the first spatial axis
        base = torch.randn(b, 2 * rest[0], *rest[1:], dim, generator=generator) * 2
        return base, lambda t: t.movedim(-1, 1)[:, :, ::2]
    base = torch.randn(b, dim, *rest, generator=generator) * 2
    return base, lambda t: t


CONFIGS = [
    pytest.param(levels, nc, proj, shape, strided, id=f"{'x'.join(map(str, levels))}-c{nc}-{'proj' if proj else 'noproj'}-{shape}-{'strided' if strided else 'contig'}")
    for levels, nc, proj, shape, strided in itertools.product(LEVEL_SETS, [1, 2], [False, True], SHAPES, [False, True])
]


@pytest.mark.parametrize("levels,num_codebooks,projection,shape_kind,strided", CONFIGS)
def test_forward_backward_matches_oracle(levels, num_codebooks, projection, shape_kind, strided, backend):
    seed = zlib.crc32(repr((levels, num_codebooks, projection, shape_kind, strided)).encode())
    oracle, ours = make_pair(levels, num_codebooks, projection, backend, seed)
    gen = torch.Generator().manual_seed(seed)
    base, view = make_input(shape_kind, ours.dim, strided, gen)
    if strided:
        assert not view(base).is_contiguous()

    base_o = base.clone().requires_grad_(True)
    base_u = base.clone().requires_grad_(True)
    out_o, idx_o = oracle(view(base_o))
    out_u, idx_u = ours(view(base_u))

    assert idx_u.dtype == torch.int32
    assert idx_u.shape == idx_o.shape
    assert torch.equal(idx_u, idx_o.to(torch.int32))
    assert out_u.shape == out_o.shape and out_u.dtype == out_o.dtype == torch.float32
    torch.testing.assert_close(out_u, out_o, rtol=0, atol=1e-6)

    grad_out = torch.randn(out_o.shape, generator=gen)
    out_o.backward(grad_out)
    out_u.backward(grad_out)
    torch.testing.assert_close(base_u.grad, base_o.grad, rtol=0, atol=1e-5)
    params_o = dict(oracle.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, params_o[name].grad, rtol=0, atol=1e-5, msg=name)

    # decoding the indices gives the oracle's codes (projected and channel-first as the oracle does)
    with torch.no_grad():
        codes_o = oracle.indices_to_codes(idx_o)
        codes_u = ours.indices_to_codes(idx_u)
    assert codes_u.shape == codes_o.shape
    torch.testing.assert_close(codes_u, codes_o, rtol=0, atol=1e-6)


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=lambda lv: "x".join(map(str, lv)))
def test_quantize_and_codes_to_indices_match_oracle(levels, backend):
    oracle = vqp.FSQ(levels=levels)
    ours = FSQ(levels, backend=backend)
    gen = torch.Generator().manual_seed(len(levels) * 1000 + levels[0])

    z = (torch.randn(3, 17, len(levels), generator=gen) * 3).requires_grad_(True)
    z_o = z.detach().clone().requires_grad_(True)
    codes_u = ours.quantize(z)
    codes_o = oracle.quantize(z_o)
    assert codes_u.shape == z.shape and codes_u.dtype == z.dtype
    torch.testing.assert_close(codes_u, codes_o, rtol=0, atol=1e-6)
    grad = torch.randn(z.shape, generator=gen)
    codes_u.backward(grad)
    codes_o.backward(grad)
    torch.testing.assert_close(z.grad, z_o.grad, rtol=0, atol=1e-5)

    grid, _ = random_grid_codes(levels, (5, 13), gen)
    assert torch.equal(ours.codes_to_indices(grid), oracle.codes_to_indices(grid).to(torch.int32))

    assert ours.codebook_size == oracle.codebook_size
    torch.testing.assert_close(ours.implicit_codebook, oracle.implicit_codebook, rtol=0, atol=0)


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_state_dicts_interchange(num_codebooks):
    """A reference state dict loads into ours strictly and ours loads into the reference strictly."""
    torch.manual_seed(0)
    oracle = vqp.FSQ(levels=[8, 5, 5], dim=11, num_codebooks=num_codebooks)
    ours = FSQ([8, 5, 5], dim=11, num_codebooks=num_codebooks)
    assert set(ours.state_dict()) == set(oracle.state_dict())
    for name, t in ours.state_dict().items():
        assert t.shape == oracle.state_dict()[name].shape, name
    ours.load_state_dict(oracle.state_dict(), strict=True)
    oracle.load_state_dict(ours.state_dict(), strict=True)
