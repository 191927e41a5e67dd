"""Round trips between codes and indices, randomized, on both backends; exact indices for large levels."""

import pytest
import torch

from conftest import ref_basis, ref_forward, ref_indices_to_codes, random_grid_codes

from fsq_triton import FSQ

LEVEL_SETS = [
    [8, 5, 5, 5],
    [2, 3, 4, 5],
    [7],
    [16, 16, 16],
    [26, 27, 38],  # the reference's float index truncates one too low for some of these
    [39, 42, 101],
    [1000, 1000, 1000],  # 1e9 codes: a float32 index sum is not exact
    [1000, 1000, 1000, 2],  # 2e9 codes: near the int32 limit
]
IDS = ["x".join(map(str, lv)) for lv in LEVEL_SETS]
SEEDS = [0, 1, 2]


def exact_indices(level, levels):
    """Index of integer levels ``(..., d)``, by integer arithmetic."""
    return (level * torch.tensor(ref_basis(levels), dtype=torch.int64)).sum(-1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=IDS)
def test_codes_indices_codes(levels, seed, backend):
    m = FSQ(levels, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    q, level = random_grid_codes(levels, (3, 50), gen)
    # include the corners of the grid
    q[0, 0], level[0, 0] = -1.0, 0
    top = torch.tensor([lv - 1 for lv in levels])
    half_width = torch.tensor([lv // 2 for lv in levels])
    level[0, 1] = top
    q[0, 1] = (top - half_width).float() / half_width.float()

    indices = m.codes_to_indices(q)
    assert indices.dtype == torch.int32 and indices.shape == q.shape[:-1]
    assert torch.equal(indices.long(), exact_indices(level, levels))
    assert indices[0, 0] == 0 and indices[0, 1] == m.codebook_size - 1

    for idx in (indices, indices.long()):
        codes = m.indices_to_codes(idx)
        assert codes.shape == q.shape and codes.dtype == torch.float32
        assert torch.equal(codes, q)
        assert torch.equal(m.indices_to_codes(idx, project_out=False), q)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=IDS)
def test_random_indices_decode_exactly(levels, seed, backend):
    m = FSQ(levels, backend=backend)
    gen = torch.Generator().manual_seed(100 + seed)
    indices = torch.randint(0, m.codebook_size, (2, 7, 9), generator=gen)
    indices[0, 0, 0] = 0
    indices[0, 0, 1] = m.codebook_size - 1
    codes = m.indices_to_codes(indices)  # (b, h, w): an image, channel-first codes
    expected = ref_indices_to_codes(indices, levels).movedim(-1, 1)
    assert codes.shape == (2, len(levels), 7, 9)
    assert torch.equal(codes, expected)
    back = m.codes_to_indices(codes.movedim(1, -1))
    assert torch.equal(back.long(), indices)


FORWARD_LEVEL_SETS = LEVEL_SETS[:-1]  # the interpreter is slow on 1000 levels: one such set is enough here


@pytest.mark.parametrize("levels", FORWARD_LEVEL_SETS, ids=IDS[:-1])
@pytest.mark.parametrize("shape_kind", ["seq", "image", "video"])
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_forward_decode_reproduces_out(levels, shape_kind, num_codebooks, backend):
    e = len(levels) * num_codebooks
    shape = {"seq": (2, 19, e), "image": (2, e, 5, 6), "video": (2, e, 2, 3, 4)}[shape_kind]
    gen = torch.Generator().manual_seed(len(levels) + 10 * num_codebooks)
    z = torch.randn(shape, generator=gen) * 2
    z.view(-1)[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    m = FSQ(levels, num_codebooks=num_codebooks, backend=backend)
    out, indices = m(z)

    # indices are exact, from the integer levels (not from the float code, as the reference's are)
    ref_out, ref_idx = ref_forward(z, levels, num_codebooks)
    assert torch.equal(indices.long(), ref_idx)
    assert torch.equal(out, ref_out)

    decoded = m.indices_to_codes(indices, project_out=False)
    assert decoded.shape == out.shape
    assert torch.equal(decoded, out)
    assert torch.equal(m.indices_to_codes(indices), out)

    tokens = out.movedim(1, -1) if out.ndim >= 4 else out
    tokens = tokens.reshape(*tokens.shape[:-1], num_codebooks, len(levels))
    back = m.codes_to_indices(tokens)
    if not m.keep_num_codebooks_dim:
        back = back.squeeze(-1)
    assert torch.equal(back, indices)


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_forward_decode_with_projection(num_codebooks, backend):
    """With projections, decoding without project_out gives the quantized codes, with it the output."""
    torch.manual_seed(3)
    levels = [8, 6, 5]
    m = FSQ(levels, dim=20, num_codebooks=num_codebooks, backend=backend)
    for z in (torch.randn(2, 11, 20), torch.randn(2, 20, 3, 4)):
        out, indices = m(z)
        with torch.no_grad():
            decoded = m.indices_to_codes(indices)
        assert decoded.shape == out.shape
        torch.testing.assert_close(decoded, out.detach(), rtol=0, atol=1e-6)
        codes = m.indices_to_codes(indices, project_out=False)
        e = len(levels) * num_codebooks
        assert codes.shape[-1 if z.ndim == 3 else 1] == e
        tokens = codes.movedim(1, -1) if z.ndim == 4 else codes
        back = m.codes_to_indices(tokens.reshape(*tokens.shape[:-1], num_codebooks, len(levels)))
        assert torch.equal(back.squeeze(-1) if not m.keep_num_codebooks_dim else back, indices)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4, 5], [26, 27, 38]], ids=lambda lv: "x".join(map(str, lv)))
def test_codes_to_indices_off_grid(levels):
    """-1 for a token with a NaN code or a code outside the grid's range; other tokens unaffected."""
    m = FSQ(levels)
    d = len(levels)
    half_width = torch.tensor([lv // 2 for lv in levels]).float()
    top = torch.tensor([(lv - 1 - lv // 2) / (lv // 2) for lv in levels])
    gen = torch.Generator().manual_seed(7)
    q, level = random_grid_codes(levels, (40,), gen)
    bad_values = [float("nan"), float("inf"), -float("inf"), -1.0 - 1.0 / half_width, top + 1.0 / half_width, 2.0, -5.0]
    expected = exact_indices(level, levels)
    for k, bad in enumerate(bad_values):
        j = k % d
        value = bad[j] if isinstance(bad, torch.Tensor) else bad
        q[k, j] = value
        expected[k] = -1
    got = m.codes_to_indices(q)
    assert torch.equal(got.long(), expected)
    # the grid's own extremes are valid
    assert m.codes_to_indices(top[None]).item() == m.codebook_size - 1
    assert m.codes_to_indices(-torch.ones(1, d)).item() == 0


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
def test_indices_dtypes(dtype, backend):
    levels = [5, 4, 3]
    m = FSQ(levels, backend=backend)
    indices = torch.arange(m.codebook_size).reshape(2, 30).to(dtype)
    codes = m.indices_to_codes(indices)
    assert torch.equal(codes, ref_indices_to_codes(indices.long(), levels))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
def test_indices_dtypes_with_projection(dtype, backend):
    levels = [5, 4, 3]
    torch.manual_seed(0)
    m = FSQ(levels, dim=7, backend=backend)
    indices = torch.arange(m.codebook_size).reshape(2, 30).to(dtype)
    with torch.no_grad():
        codes = m.indices_to_codes(indices)
        expected = m.project_out(ref_indices_to_codes(indices.long(), levels))
    torch.testing.assert_close(codes, expected, rtol=0, atol=1e-6)
