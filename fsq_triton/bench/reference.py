"""``ReferenceFSQ``: the reference FSQ module, op for op, as the baseline of the benchmark.

It performs the operations of CogVideo's ``FSQ``
(``sat/sgm/modules/autoencoding/regularizers/finite_scalar_quantization.py``, the early ``FSQ`` of
vector-quantize-pytorch) in the same order, in eager PyTorch, so that its speed is the speed users
see today. ``bench/test_reference.py`` (in the repository) checks it against the golden outputs of the real module.

One departure, for the benchmark's sake: the ``implicit_codebook`` buffer is built only when
``codebook_size <= 2**20`` (it is ``None`` above that), where the reference always builds it, which
costs seconds and gigabytes for large codebooks and plays no part in ``forward``.

Shape letters: ``b`` batch, ``n`` tokens (sequence or flattened space), ``c`` codebooks,
``d`` channels (``codebook_dim = len(levels)`` after ``project_in``, ``dim`` before it).
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import pack, rearrange, unpack
from torch import nn

IMPLICIT_CODEBOOK_LIMIT = 2**20


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round half to even, with the straight-through gradient: ``z + (round(z) - z).detach()``."""
    return z + (z.round() - z).detach()


class ReferenceFSQ(nn.Module):
    """The reference FSQ: ``(out, indices) = ReferenceFSQ(levels)(z)``.

    Args:
        levels: levels per channel of a codebook, e.g. ``[8, 5, 5, 5, 5]``.
        dim: input feature size; defaults to ``len(levels) * num_codebooks``. When it differs,
            ``project_in``/``project_out`` are ``nn.Linear`` to and from the codebook channels.
        num_codebooks: codebooks per token, each with its own index and the same ``levels``.
        keep_num_codebooks_dim: keep the codebook axis in ``indices``; defaults to ``num_codebooks > 1``.
        scale: stored, unused.

    Quirks kept from the reference: the quantization math runs in the dtype that ``z`` promotes to
    against the float32 constants (a bfloat16 input gives a float32 ``out``), and
    ``codes_to_indices`` truncates a float sum to int32.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        levels = list(levels)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer(
            "_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32), persistent=False
        )
        self.scale = scale

        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim must be True when num_codebooks > 1")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else dim

        self.has_projections = self.dim != self.effective_codebook_dim
        self.project_in = nn.Linear(self.dim, self.effective_codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.effective_codebook_dim, self.dim) if self.has_projections else nn.Identity()

        self.codebook_size = int(self._levels.prod().item())
        implicit_codebook = None
        if self.codebook_size <= IMPLICIT_CODEBOOK_LIMIT:
            implicit_codebook = self.indices_to_codes(torch.arange(self.codebook_size), project_out=False)
        self.register_buffer("implicit_codebook", implicit_codebook, persistent=False)

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """``tanh(z + shift) * half_l - offset`` for ``z (..., d)``: each channel squashed into its level range."""
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of ``z (..., d)``, same shape: the rounded bound over ``half_width = L // 2``, straight-through."""
        return round_ste(self.bound(z)) / (self._levels // 2)

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Index of each code ``zhat (..., d)`` -> ``(...)`` int32, by the reference's float sum and truncation."""
        half_width = self._levels // 2
        return ((zhat * half_width + half_width) * self._basis).sum(dim=-1).to(torch.int32)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Codes of ``indices`` (``(b, n)``, ``(b, *spatial)``, with a trailing ``c`` when ``keep_num_codebooks_dim``).

        Returns ``(b, n, dim)``, or channel-first ``(b, dim, *spatial)`` when
        ``indices.ndim >= 3 + keep_num_codebooks_dim``; ``project_out=False`` skips the output projection.
        """
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        indices = rearrange(indices, "... -> ... 1")
        half_width = self._levels // 2
        codes = ((indices // self._basis) % self._levels - half_width) / half_width
        if self.keep_num_codebooks_dim:
            codes = rearrange(codes, "... c d -> ... (c d)")
        if project_out:
            codes = self.project_out(codes)
        if is_img_or_video:
            codes = rearrange(codes, "b ... d -> b d ...")
        return codes

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z (b, n, dim)`` or channel-first ``(b, dim, *spatial)`` -> ``(out in z's shape, indices)``.

        ``indices`` is int32 ``(b, n)``/``(b, *spatial)``, with a trailing ``c`` when ``keep_num_codebooks_dim``.
        CUDA autocast is off inside, as in the reference.
        """
        with torch.autocast("cuda", enabled=False):
            is_img_or_video = z.ndim >= 4
            if is_img_or_video:
                z = rearrange(z, "b d ... -> b ... d")
                z, packed_shape = pack([z], "b * d")
            if z.shape[-1] != self.dim:
                raise ValueError(f"expected dimension of {self.dim} but found dimension of {z.shape[-1]}")

            z = self.project_in(z)
            z = rearrange(z, "b n (c d) -> b n c d", c=self.num_codebooks)
            codes = self.quantize(z)
            indices = self.codes_to_indices(codes)
            codes = rearrange(codes, "b n c d -> b n (c d)")
            out = self.project_out(codes)

            if is_img_or_video:
                out = unpack(out, packed_shape, "b * d")[0]
                out = rearrange(out, "b ... d -> b d ...")
                indices = unpack(indices, packed_shape, "b * c")[0]
            if not self.keep_num_codebooks_dim:
                indices = rearrange(indices, "... 1 -> ...")
            return out, indices
