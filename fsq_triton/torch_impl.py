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

from .levels import LevelTables


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, with the straight-through gradient (the reference's ``round_ste``)."""
    return x + (x.round() - x).detach()


def quantize(z: torch.Tensor, tables: LevelTables, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FSQ forward on the feature view, differentiable (straight-through) by plain autograd.

    z: (b, c*d, n) float -> out: (b, c*d, n) in z's dtype, indices: (b, n, c) int32.
    """
    zc = rearrange(z, "b (c d) n -> b n c d", c=num_codebooks).float()
    bounded = (zc + tables.shift).tanh() * tables.half_l - tables.offset
    q = round_ste(bounded)
    codes = q / tables.half_width

    # exact index from the integer level; NaN tokens get -1 (their cast below is discarded)
    level = (q.detach() + tables.half_width).nan_to_num(0.0).to(torch.int64)
    indices = (level * tables.basis).sum(dim=-1)
    indices = torch.where(zc.isnan().any(dim=-1), -1, indices).to(torch.int32)

    out = rearrange(codes, "b n c d -> b (c d) n").to(z.dtype)
    return out, indices


def quantize_backward(grad_out: torch.Tensor, z: torch.Tensor, shift: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """Straight-through gradient on the feature view: ``grad * (half_l / half_width) * (1 - tanh(z + shift)^2)``.

    ``shift`` and ``grad_scale`` are per channel of one codebook, (d,). grad_out, z: (b, c*d, n) -> (b, c*d, n)
    in z's dtype. (Autograd through :func:`quantize` gives the same within an ulp; this is the custom op's CPU path.)
    """
    per_channel = lambda t: t.repeat(z.shape[1] // t.numel())[:, None]  # noqa: E731  (c*d, 1), codebook-major
    t = (z.float() + per_channel(shift)).tanh()
    return (grad_out.float() * per_channel(grad_scale) * (1 - t * t)).to(z.dtype)


def indices_to_codes(
    indices: torch.Tensor, tables: LevelTables, codebook_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Codes of the indices on the feature view: (b, n, c) integer -> (b, c*d, n).

    ``level_j = (index // basis_j) % L_j`` and ``code_j = (level_j - half_width_j) / half_width_j``. An index
    outside ``[0, prod(levels))`` gives NaN codes (the module checks the range first where that is free).
    """
    idx = indices.to(torch.int64)[..., None]
    level = (idx // tables.basis) % tables.num_levels
    codes = (level - tables.half_width) / tables.half_width
    valid = (idx >= 0) & (idx < codebook_size)
    codes = torch.where(valid, codes, float("nan"))
    return rearrange(codes, "b n c d -> b (c d) n").to(dtype)
