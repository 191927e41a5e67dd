"""The plain PyTorch path: the CPU implementation, and the oracle of fsq_triton's semantics.

It performs the reference's own ops in the reference's order (so it matches the reference bit for
bit on whatever device it runs), with fsq_triton's deliberate differences: quantization math in
float32 whatever the input dtype, ``out`` in the input's dtype, exact integer indices computed from
the integer level (not from the float code), and index ``-1`` for a token with a NaN channel.

Shape letters: ``b`` batch, ``n`` tokens (sequence or flattened space), ``c`` codebooks, ``d``
channels of one codebook (``len(levels)``). Every function here takes the *feature view*
``z: (b, c*d, n)`` with any strides, which is how the module hands channel-first images and videos
(``(b, c*d, *spatial)`` flattened) and channel-last sequences (``(b, n, c*d)`` transposed) alike.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .levels import COL_THRESHOLDS, LevelTables, max_level_of


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, with the straight-through gradient (the reference's ``round_ste``)."""
    return x + (x.round() - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor, with the straight-through gradient (vqp's ``floor_ste``, of its symmetric bound)."""
    return x + (x.floor() - x).detach()


def _per_channel(t: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """A per-channel constant of one codebook, (d,), as a column over the feature view's channels, (c*d, 1)."""
    return t.repeat(num_codebooks)[:, None]


def quantize(z: torch.Tensor, tables: LevelTables, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FSQ forward on the feature view, differentiable (straight-through) by plain autograd.

    z: (b, c*d, n) float -> out: (b, c*d, n) in z's dtype and memory layout, indices: (b, n, c) int32.
    The elementwise math runs in z's own layout (no channel-last copy), the constants broadcast per channel,
    and half-precision z is promoted by the first add, as in the reference.
    """
    c = num_codebooks
    x = z if z.dtype in (torch.float32, torch.bfloat16, torch.float16) else z.float()
    if tables.bound in ("tanh_shift", "clamp_shift"):
        shifted = x + _per_channel(tables.shift, c)
        bounded = shifted.tanh() if tables.bound == "tanh_shift" else torch.clamp(shifted, min=-1.0, max=1.0)
        q = round_ste(bounded * _per_channel(tables.half_l, c) - _per_channel(tables.offset, c))
        out = (q / _per_channel(tables.half_width, c)).to(z.dtype)
        level = q.detach() + _per_channel(tables.half_width, c)
    else:  # vqp's symmetry_preserving_bound: 2 / (L - 1) * floor((L - 1) * (bound(z) + 1) / 2 + 0.5) - 1
        levels_minus_1 = _per_channel(tables.num_levels, c) - 1
        x = z.float()  # no shift add to promote half precision: vqp's force_quantization_f32 does it
        bounded = x.tanh() if tables.bound == "sym_tanh" else torch.clamp(x, min=-1.0, max=1.0)
        bracket = floor_ste((levels_minus_1 * (bounded + 1) / 2.0) + 0.5)
        out = ((2.0 / levels_minus_1) * bracket - 1.0).to(z.dtype)
        level = bracket.detach()

    # exact index from the integer levels (small integers, exact in index_dtype); NaN in z -> NaN sum -> -1
    level = rearrange(level, "b (c d) n -> b c d n", c=c)
    index = (level.to(tables.index_dtype) * tables.basis.to(tables.index_dtype)[:, None]).sum(dim=2)
    index = torch.where(index.isnan(), -1, index).to(torch.int32)          # (b, c, n)
    return out, rearrange(index, "b c n -> b n c").contiguous()


def quantize_backward(
    grad_out: torch.Tensor, z: torch.Tensor, shift: torch.Tensor, grad_scale: torch.Tensor,
    clamp_lo: torch.Tensor | None = None, clamp_hi: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Straight-through gradient on the feature view: ``grad * grad_scale * (1 - tanh(z + shift)^2)`` for the tanh
    bounds, ``grad * grad_scale`` where ``clamp_lo <= z < clamp_hi`` (else 0) for the hard clamps (``smooth = 0``).

    The constants are per channel of one codebook, (d,) (:class:`fsq_triton.levels.LevelTables` columns; without
    ``smooth`` the tanh bound). grad_out, z: (b, c*d, n) -> (b, c*d, n) in z's dtype. (Autograd through
    :func:`quantize` gives the same within an ulp; this is the custom op's CPU path.)
    """
    c = z.shape[1] // shift.numel()
    zf = z.float()
    t = (zf + _per_channel(shift, c)).tanh()
    grad = grad_out.float() * _per_channel(grad_scale, c)
    smooth_grad = grad * (1 - t * t)
    if smooth is None:
        return smooth_grad.to(z.dtype)
    inside = (zf >= _per_channel(clamp_lo, c)) & (zf < _per_channel(clamp_hi, c))
    clamp_grad = torch.where(inside, grad, 0.0)
    return torch.where(_per_channel(smooth, c) != 0, smooth_grad, clamp_grad).to(z.dtype)


def quantize_by_tables(
    z: torch.Tensor, values: torch.Tensor, integers: torch.Tensor, num_codebooks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' math in torch ops, for the custom ops' CPU fallback: ``level = #{k : z >= thr[j, k]}``,
    ``code = codes[j, level]``, on the feature view (b, c*d, n) -> out (b, c*d, n) in z's dtype, indices (b, n, c).

    The same for every bound (:data:`fsq_triton.levels.BOUNDS`) with no host read, so that it traces with fake
    tensors (torch.compile, export) and gives the calibrated bound's results; exact on the device the tables were
    calibrated on. Not differentiable (the ops' gradient is ``quantize_backward``).
    """
    c = num_codebooks
    max_level = max_level_of(values)
    thresholds = values[:, COL_THRESHOLDS : COL_THRESHOLDS + max_level - 1].repeat(c, 1)   # (c*d, L - 1)
    codes = values[:, COL_THRESHOLDS + max_level - 1 :].repeat(c, 1)                       # (c*d, L)
    x = z.float()
    level = torch.zeros(x.shape, dtype=torch.int64, device=z.device)
    for k in range(max_level - 1):  # NaN padding never counts
        level += (x >= thresholds[:, k, None]).to(torch.int64)
    out = torch.gather(codes[None].expand(x.shape[0], -1, -1), 2, level)
    out = torch.where(x.isnan(), x, out).to(z.dtype)

    basis = integers[:, 0].to(torch.int64)  # COL_BASIS
    level = rearrange(level, "b (c d) n -> b c d n", c=c)
    index = (level * basis[:, None]).sum(dim=2)
    token_nan = rearrange(x.isnan(), "b (c d) n -> b c d n", c=c).any(dim=2)
    index = torch.where(token_nan, -1, index).to(torch.int32)
    return out, rearrange(index, "b c n -> b n c").contiguous()


def indices_to_codes_by_tables(
    indices: torch.Tensor, values: torch.Tensor, integers: torch.Tensor, codebook_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The decode kernel's math in torch ops, for the custom ops' CPU fallback: (b, n, c) -> (b, c*d, n) codes,
    ``codes[j, (index // basis_j) % L_j]`` from the table (every bound, no host read), NaN out of range."""
    max_level = max_level_of(values)
    codes = values[:, COL_THRESHOLDS + max_level - 1 :]                                    # (d, L)
    idx = indices if indices.dtype in (torch.int32, torch.int64) else indices.to(torch.int64)
    level = (idx[..., None] // integers[:, 0]) % integers[:, 1]                            # (b, n, c, d)
    out = codes[torch.arange(codes.shape[0], device=codes.device), level.to(torch.int64)]
    valid = (idx >= 0) & (idx < codebook_size)
    out = torch.where(valid[..., None], out, float("nan"))
    return rearrange(out, "b n c d -> b (c d) n").to(dtype)


def indices_to_codes(
    indices: torch.Tensor, tables: LevelTables, codebook_size: int, dtype: torch.dtype = torch.float32,
    assume_valid: bool = False,
) -> torch.Tensor:
    """Codes of the indices on the feature view: (b, n, c) integer -> (b, c*d, n).

    ``level_j = (index // basis_j) % L_j`` and ``code_j = (level_j - half_width_j) / half_width_j`` (symmetric bounds:
    ``level_j * (2 / (L_j - 1)) - 1``, vqp's order). An index
    outside ``[0, prod(levels))`` gives NaN codes, unless the caller has checked the range (``assume_valid``).
    """
    idx = indices if indices.dtype in (torch.int32, torch.int64) else indices.to(torch.int64)
    level = (idx[..., None] // tables.basis) % tables.num_levels
    if tables.bound in ("tanh_shift", "clamp_shift"):
        codes = (level - tables.half_width) / tables.half_width
    else:  # vqp's symmetric _scale_and_shift_inverse
        codes = level * (2.0 / (tables.num_levels - 1)) - 1.0
    if not assume_valid:
        valid = (idx >= 0) & (idx < codebook_size)
        codes = torch.where(valid[..., None], codes, float("nan"))
    return rearrange(codes, "b n c d -> b (c d) n").to(dtype)
