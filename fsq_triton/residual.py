"""``ResidualFSQ`` and ``GroupedResidualFSQ``: vector-quantize-pytorch 1.32's surface, name for name, on one fused kernel.

Shape letters: ``b`` batch, ``n`` tokens (sequence or flattened space), ``d`` codebook channels (``len(levels)``),
``q`` stages (``num_quantizers``), ``g`` groups.

Two semantics, chosen at construction (keyword-only ``semantics``):

- ``"current"`` (default): vqp >= 1.26 (oracle 1.32). Stages use the symmetric quantizer
  (``preserve_symmetry=True``), scales ``L ** -s``, and by default (``bound_hard_clamp=True``) a soft clamp
  ``tanh(x / c) * c`` with ``c = 1 + 1 / (L - 1)`` before the stages and a hard clamp inside them.
- ``"pre-1.26"``: vqp 1.25.2 exactly. Stages use the original tanh bound (unless ``preserve_symmetry=True`` is
  passed), scales ``(L - 1) ** -s``, and a soft clamp only if ``soft_clamp_input_value`` is given.

``backend="torch"`` runs vqp's own op sequence (the CPU path and the oracle); ``"triton"`` runs the fused kernel
(:mod:`fsq_triton.ops.residual`: every stage and every group in one launch, read ``x`` once, write the quantized sum
and the ``q`` indices once; the backward recomputes the stages from ``x``); ``"auto"`` picks Triton on CUDA (and on
CPU under ``TRITON_INTERPRET=1``). With projections (``dim != len(levels)``) the kernel also runs ``project_out``
(plain ``nn.Linear``, ``dim % 16 == 0``; see :meth:`ResidualFSQ._fused_project_out`), every group in the same launch;
``project_in`` stays ``nn.Linear``: deep stages resolve its output below float32's resolution (8 stages of
[8, 5, 5, 5]: one ulp moves the last stage's index for about a quarter of the tokens), so vqp's indices need
``nn.Linear``'s own rounding, which no fused sum reproduces. Inputs the kernel does not reproduce bit for bit (float64,
or a half-precision input with a scalar soft clamp, which vqp evaluates in half precision) take the torch path.

Where fsq_triton differs from vqp on purpose: a token with a NaN channel gets index ``-1`` in every stage (vqp: an
arbitrary integer); decoding channel-first indices works (vqp's ``get_codes_from_indices`` treats their last axis as
the stage axis and fails or returns garbage); ``GroupedResidualFSQ`` draws and all-reduces its dropout seed only when
quantize dropout applies (vqp does on every training-mode forward, which advances the global RNG and hangs DDP when
one rank runs an extra forward); bad input raises ``ValueError``/``TypeError`` instead of asserting.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import pack, rearrange, reduce, unpack
from torch import nn

from .levels import _reference_constants, basis_of, validate_levels
from .module import BACKENDS, BackendUnavailableError, _is_plain
from .residual_levels import residual_tables, stage_scales

SEMANTICS = ("current", "pre-1.26")

try:
    from .ops import residual as _ops
except ImportError:  # no triton: the torch path serves everything
    _ops = None

# vqp FSQ keyword arguments a stage accepts, with the values this implementation supports.
_FSQ_KWARGS_FIXED = {
    "num_codebooks": 1, "keep_num_codebooks_dim": (None, False), "return_indices": True, "channel_first": False,
    "noise_dropout": 0.0, "orthogonal_rotation": False,
}
_FSQ_KWARGS_FREE = ("scale", "allowed_dtypes", "force_quantization_f32", "projection_has_bias", "preserve_symmetry")


def _exists(v) -> bool:
    return v is not None


def round_up_multiple(num: int, mult: int) -> int:
    return math.ceil(num / mult) * mult


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_maybe_sync_seed(device, max_size: int = 10_000) -> int:
    """vqp's seed for the dropout cut: one draw of the global torch RNG, summed over the ranks (so every rank of a
    process group gets the same seed, from one collective that every rank reaches)."""
    rand_int = torch.randint(0, max_size, (), device=device)
    if is_distributed():
        dist.all_reduce(rand_int)
    return int(rand_int.item())


def _transformed() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) or forward-mode AD is active outside torch.compile: the
    fused kernels' autograd.Functions have no vmap or jvp rule, so such calls take vqp's ops (the torch path, exact
    by definition, differentiable in every mode)."""
    if torch.compiler.is_compiling():
        return False
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def _round_ste(z):
    return z + (z.round() - z).detach()


def _floor_ste(z):
    return z + (z.floor() - z).detach()


# The dtypes autocast casts to its own (a float64 parameter stays float64, and nn.Linear then raises)
_AUTOCAST_CAST = (torch.float32, torch.float16, torch.bfloat16)

def _stacked(pairs):
    """Each group's ``(weight, bias or None)`` stacked along the rows into one ``(weight, bias or None)`` for the one
    launch, or None if a group's is None or they disagree in dtype or in having a bias."""
    if any(p is None for p in pairs) or len({w.dtype for w, _ in pairs}) != 1 or len({b is None for _, b in pairs}) != 1:
        return None
    return torch.cat([w for w, _ in pairs]), None if pairs[0][1] is None else torch.cat([b for _, b in pairs])


# Devices whose decode checks the index range on the host (raising IndexError); elsewhere bad indices decode to NaN.
_RANGE_CHECKED_DEVICES = ("cpu",)


class ResidualFSQ(nn.Module):
    """Residual FSQ (Algorithm 1 of arXiv 2107.03312 with FSQ stages), a drop-in for vqp's ``ResidualFSQ``.

    ``forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)`` takes ``(b, n, dim)`` (or
    ``(b, dim, *spatial)`` with ``is_channel_first``) and returns ``(quantized, indices)``: ``quantized`` in ``x``'s
    shape (float32 unless projections or float64 say otherwise, as vqp), ``indices`` ``(b, n, q)`` int32 (int64
    when quantize dropout dropped a stage, as vqp; channel-first: ``(b, q, *spatial)``), and with
    ``return_all_codes`` the scaled codes ``(q, b, n, d)`` (channel-first: ``(q, b, *spatial, d)``).
    """

    # Where the soft clamp runs: True inside the kernel (one pass over x), False in torch ops before the kernel
    # (three more passes), None (the default) inside the kernel wherever that gives torch's indices and outputs:
    # always under Triton's interpreter (its tanh is torch.tanh), and on a GPU where ops.residual's
    # soft_clamp_matches_torch finds the kernel's tanh and soft clamp bit-equal to torch's for this module's c (a check
    # of 4.5M values, once per device) and no stage threshold lies next to 0 (_flush_band_clear). The first H200 run
    # (torch 2.11, triton 3.6, 2026-11-28; bench/results/2026-11-28-h200/run2/residual.json) measured 612,934 of 40M
    # indices moved by the fused soft clamp; the likely cause, from that kernel's PTX: `tanh(.) * c` fused with the
    # first stage's subtraction into one multiply-add (now `mul.rn`; bench/NOTES.md). fuse_project_in keeps the soft
    # clamp in the kernel whatever this says (h never leaves it).
    soft_clamp_in_kernel: bool | None = None

    # Opt-in: ``project_in`` in the kernel too (a ``tl.dot`` per token tile, float32 accumulation in the kernel's
    # order), so that the projected forward reads ``x`` once and launches once. Off by default because it is not vqp
    # bit for bit: ``h`` can differ from ``nn.Linear``'s by an ulp (on the CPU 90.6% of a float32 ``nn.Linear(1024,
    # 4)``'s outputs differ from the correctly rounded sum, 1.2e-4 under bfloat16 autocast), and deep stages resolve
    # ``h`` below float32's resolution (8 stages of [8, 5, 5, 5]: one ulp moves the last index of 23% of tokens); the
    # soft clamp then runs in the kernel on CUDA too (``h`` never leaves it). Same conditions as ``project_out``'s
    # fusion (plain ``nn.Linear`` layers, ``dim % 16 == 0``, float32 weights or autocast); a class or instance
    # attribute.
    fuse_project_in: bool = False

    def __init__(
        self,
        *,
        levels: Sequence[int],
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value=None,
        bound_hard_clamp: bool | None = None,
        semantics: str = "current",
        backend: str = "auto",
        **fsq_kwargs,
    ):
        super().__init__()
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS} ('current' is vqp >= 1.26, 'pre-1.26' is vqp 1.25.2), found {semantics!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, found {backend!r}")
        levels = validate_levels(levels)
        if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, found {num_quantizers!r}")
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int or None, found {dim!r}")
        if isinstance(quantize_dropout_cutoff_index, bool) or not isinstance(quantize_dropout_cutoff_index, int) \
                or quantize_dropout_cutoff_index < 0:
            raise ValueError(f"quantize_dropout_cutoff_index must be an int >= 0, found {quantize_dropout_cutoff_index!r}")
        if isinstance(quantize_dropout_multiple_of, bool) or not isinstance(quantize_dropout_multiple_of, int) \
                or quantize_dropout_multiple_of < 1:
            raise ValueError(f"quantize_dropout_multiple_of must be a positive int, found {quantize_dropout_multiple_of!r}")
        if quantize_dropout and num_quantizers > 1 and quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(
                f"quantize_dropout_cutoff_index ({quantize_dropout_cutoff_index}) must be below num_quantizers ({num_quantizers})")

        for key, value in fsq_kwargs.items():
            if key in _FSQ_KWARGS_FIXED:
                allowed = _FSQ_KWARGS_FIXED[key]
                if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                    raise ValueError(f"fsq_triton.ResidualFSQ supports {key}={allowed!r} only, found {value!r}")
            elif key not in _FSQ_KWARGS_FREE:
                raise TypeError(f"ResidualFSQ got an unexpected keyword argument {key!r}")

        preserve_symmetry = fsq_kwargs.get("preserve_symmetry")
        if semantics == "current":
            if preserve_symmetry is not None:
                raise ValueError("vqp >= 1.26 always builds its stages with preserve_symmetry=True; do not pass it "
                                 "(use semantics='pre-1.26' for vqp 1.25.2's preserve_symmetry option)")
            bound_hard_clamp = True if bound_hard_clamp is None else bool(bound_hard_clamp)
            if bound_hard_clamp and soft_clamp_input_value is not None:
                raise ValueError("soft_clamp_input_value must be None with bound_hard_clamp=True: the hard clamp sets "
                                 "its own soft clamp 1 + 1 / (L - 1); pass bound_hard_clamp=False to choose the value")
            kind = "sym_clamp" if bound_hard_clamp else "sym_tanh"
        else:
            if bound_hard_clamp is not None:
                raise ValueError("bound_hard_clamp does not exist before vqp 1.26; leave it out with semantics='pre-1.26'")
            preserve_symmetry = bool(preserve_symmetry)
            if soft_clamp_input_value is not None and not isinstance(soft_clamp_input_value, (int, float)):
                raise TypeError(f"soft_clamp_input_value must be a float or None before vqp 1.26, found {type(soft_clamp_input_value).__name__}")
            kind = "sym_tanh" if preserve_symmetry else "tanh_shift"
        if kind == "tanh_shift" and 2 in levels:
            raise ValueError(
                f"levels {list(levels)}: a level of 2 needs the symmetric quantizer (vqp >= 1.26 FSQ refuses it without "
                "preserve_symmetry; with scales (L - 1) ** -s = 1 no later stage could refine it); use preserve_symmetry=True")

        self.semantics, self.backend, self._kind = semantics, backend, kind
        self.bound_hard_clamp = bound_hard_clamp
        self.project_in = nn.Linear(dim, codebook_dim) if dim != codebook_dim else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if dim != codebook_dim else nn.Identity()
        self.has_projections = dim != codebook_dim
        self.dim, self.codebook_dim = dim, codebook_dim
        self.is_channel_first = is_channel_first
        self.num_quantizers = num_quantizers
        self.levels = list(levels)
        self.codebook_size = math.prod(levels)
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.allowed_dtypes = tuple(fsq_kwargs.get("allowed_dtypes", (torch.float32, torch.float64)))
        self.force_quantization_f32 = bool(fsq_kwargs.get("force_quantization_f32", True))

        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", basis_of(levels), persistent=False)
        self.register_buffer("scales", stage_scales(levels, num_quantizers, semantics), persistent=False)

        # the soft clamp, as vqp stores it: a buffer (vqp >= 1.26) or a plain float (1.25.2)
        if semantics == "current":
            levels_tensor = torch.tensor(list(levels))
            if bound_hard_clamp:
                soft_clamp_input_value = 1 + (1 / (levels_tensor - 1))
            if isinstance(soft_clamp_input_value, (list, float)):
                soft_clamp_input_value = torch.tensor(soft_clamp_input_value)
            if soft_clamp_input_value is not None and not isinstance(soft_clamp_input_value, torch.Tensor):
                raise TypeError(f"soft_clamp_input_value must be a float, a list, a tensor or None, found {soft_clamp_input_value!r}")
            if soft_clamp_input_value is not None and soft_clamp_input_value.numel() not in (1, codebook_dim):
                raise ValueError(f"soft_clamp_input_value must hold 1 or len(levels) = {codebook_dim} values, "
                                 f"found shape {tuple(soft_clamp_input_value.shape)}")
            self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        else:
            self.soft_clamp_input_value = soft_clamp_input_value

        # the soft clamp's float32 values as Python floats: the tables' cache key, read without touching a tensor
        c = self.soft_clamp_input_value
        self._soft_clamp_key = None if c is None else tuple(
            (c.detach().float() if isinstance(c, torch.Tensor) else torch.tensor(float(c))).reshape(-1).tolist())
        if self._soft_clamp_key is not None and not all(math.isfinite(v) and v != 0 for v in self._soft_clamp_key):
            raise ValueError(f"soft_clamp_input_value must be finite and nonzero (tanh(x / c) * c), found "
                             f"{list(self._soft_clamp_key)}")
        self._soft_clamp_flush_safe = self._flush_band_clear()
        self.register_buffer("_codebook", self._stage_codes(torch.arange(self.codebook_size)), persistent=False)
        self._calibrate()

    # ----------------------------------------------------------------------------------------------
    # Constants
    # ----------------------------------------------------------------------------------------------

    def _tables(self, device):
        return residual_tables(tuple(self.levels), self.num_quantizers, self.semantics, self._kind, device,
                               self._soft_clamp_key)

    def _calibrate(self):
        device = self._levels.device
        if device.type in ("cpu", "cuda") and not self._levels.is_meta:
            self._tables(device)
            if (device.type == "cuda" and self._soft_clamp_key is not None and self.soft_clamp_in_kernel is None
                    and self.backend != "torch" and _ops is not None and self._soft_clamp_flush_safe):
                self._soft_clamp_runs_in_kernel(device)  # its check, before torch.compile can trace a first call

    def _flush_band_clear(self) -> bool:
        """Whether no stage threshold lies within ``max(1, |c|) * 2**-120`` of 0 (64 times the band where the kernel's
        soft clamp gives 0 and torch's a value below ``max(1, |c|) * 2**-126``: ``ops.residual.soft_clamp``), so that
        every stage quantizes both alike (from the CPU calibration, the same thresholds to a few ulps)."""
        if self._soft_clamp_key is None:
            return True
        tables = residual_tables(tuple(self.levels), self.num_quantizers, self.semantics, self._kind, "cpu",
                                 self._soft_clamp_key)
        band = max(1.0, max(abs(v) for v in self._soft_clamp_key)) * 2.0**-120
        thresholds = tables.thresholds
        return not bool(((thresholds.abs() <= band) & thresholds.isfinite()).any())

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        module._calibrate()
        return module

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, num_quantizers={self.num_quantizers}, dim={self.dim}, "
                f"semantics={self.semantics!r}, backend={self.backend!r}")

    def _stage_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """A stage's ``implicit_codebook`` rows for ``indices``: vqp's ``_indices_to_codes`` (``(..., d)`` float32)."""
        lv, basis = self._levels.to(indices.device), self._basis.to(indices.device)
        level = (indices[..., None] // basis) % lv
        if self._kind == "tanh_shift":
            half_width = lv // 2
            return (level - half_width) / half_width
        return level * (2.0 / (lv - 1)) - 1.0

    @property
    def codebooks(self) -> torch.Tensor:
        """``(q, codebook_size, d)``: every stage's implicit codebook (unscaled, as vqp)."""
        return self._codebook[None].expand(self.num_quantizers, -1, -1)

    # ----------------------------------------------------------------------------------------------
    # Decoding
    # ----------------------------------------------------------------------------------------------

    def _check_indices(self, indices) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, found {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, found {indices.dtype}")
        if indices.ndim < 2:
            raise ValueError(f"indices must have shape (b, ..., q) (channel-first: (b, q, ...)), found {tuple(indices.shape)}")

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Scaled codes of every stage: ``(b, n, q)`` -> ``(q, b, n, d)`` (``(b, *spatial, q)`` -> ``(q, b, *spatial, d)``).

        An index outside ``[0, codebook_size)`` (other than ``-1``) raises ``IndexError`` for CPU tensors; on CUDA,
        where the check would cost a device sync (and break CUDA-graph capture), that stage's codes are NaN, as the
        plain FSQ decode does.

        Index ``-1`` (a dropped stage) gives zero codes; fewer than ``q`` stages are padded with ``-1`` (needs
        ``quantize_dropout``, as vqp). With ``is_channel_first`` the indices are ``(b, q, *spatial)`` as ``forward``
        returns them (vqp's own decode misreads that layout).
        """
        self._check_indices(indices)
        if self.is_channel_first and indices.ndim >= 3:
            indices = rearrange(indices, "b q ... -> b ... q")
        quantize_dim = indices.shape[-1]
        if quantize_dim > self.num_quantizers:
            raise ValueError(f"indices have {quantize_dim} stages in their last axis, more than num_quantizers={self.num_quantizers}")
        bad = (indices < -1) | (indices >= self.codebook_size)
        if indices.device.type in _RANGE_CHECKED_DEVICES and bool(bad.any()):
            raise IndexError(f"indices must lie in [0, {self.codebook_size}) (or be -1 for a dropped stage), "
                             f"found {int(indices[bad].flatten()[0])}")
        indices, ps = pack([indices], "b * q")
        bad, _ = pack([bad], "b * q")
        if quantize_dim < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("quantize_dropout must be on to reconstruct from fewer stages than num_quantizers "
                                 f"({quantize_dim} < {self.num_quantizers}), as in vqp")
            indices = F.pad(indices, (0, self.num_quantizers - quantize_dim), value=-1)
        if bad.shape[-1] < self.num_quantizers:  # the -1 padding above is valid
            bad = F.pad(bad, (0, self.num_quantizers - bad.shape[-1]), value=False)
        mask = indices == -1
        codes = self._codebook.to(indices.device)[indices.masked_fill(mask | bad, 0).long()]   # b n q d
        all_codes = rearrange(codes, "b n q d -> q b n d").masked_fill(rearrange(mask, "b n q -> q b n 1"), 0.0)
        all_codes = all_codes * rearrange(self.scales, "q d -> q 1 1 d")
        all_codes = all_codes.masked_fill(rearrange(bad, "b n q -> q b n 1"), float("nan"))  # unchecked devices
        all_codes, = unpack(all_codes, ps, "q b * d")
        return all_codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``project_out`` of the summed scaled codes: ``(b, n, q)`` -> ``(b, n, dim)`` (channel-first:
        ``(b, q, *spatial)`` -> ``(b, dim, *spatial)``)."""
        codes = self.get_codes_from_indices(indices)
        out = self.project_out(reduce(codes, "q ... -> ...", "sum"))
        if self.is_channel_first and indices.ndim >= 3:
            out = rearrange(out, "b ... d -> b d ...")
        return out

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------

    def _dropout_applies(self) -> bool:
        return self.training and self.quantize_dropout and torch.is_grad_enabled()

    def _dropout_cut(self, x: torch.Tensor, seed) -> int | None:
        """The last stage kept (vqp's ``rand_quantize_dropout_index``), or None without quantize dropout.

        Without a fixed seed, the seed is one draw of the global torch RNG summed over the ranks (vqp's
        ``get_maybe_sync_seed``): every rank of a process group cuts at the same stage. The collective runs only
        where dropout applies (training, ``quantize_dropout``, grad enabled), the same condition on every rank of a
        data-parallel step.
        """
        if not self._dropout_applies():
            return None
        if seed is None:
            seed = get_maybe_sync_seed(x.device)
        rand = random.Random(seed)
        cut = rand.randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        if self.quantize_dropout_multiple_of != 1:
            cut = round_up_multiple(cut + 1, self.quantize_dropout_multiple_of) - 1
        return cut

    def _triton_ops(self, t: torch.Tensor):
        if self.backend == "torch":
            return None
        runnable = _ops is not None and (t.device.type == "cuda" or (_ops.interpreting() and t.device.type == "cpu"))
        if runnable:
            return _ops
        if self.backend == "triton":
            raise BackendUnavailableError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), found a tensor on {t.device}")
        return None

    def _soft_clamp_mode(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> int | None:
        """How the kernel evaluates the soft clamp for this input (``dtype``: the dtype of the values it clamps, when
        not ``x``'s), or None where only the torch path is exact."""
        c = self.soft_clamp_input_value
        if c is None:
            return 0
        scalar = not isinstance(c, torch.Tensor) or c.ndim == 0
        if scalar and (dtype or x.dtype) != torch.float32:
            return None  # vqp divides in x's half precision here
        if isinstance(c, torch.Tensor) and c.is_floating_point() and c.dtype != torch.float32:
            return None  # a float64 soft clamp promotes x to float64; a half one (module.half()) computes in half
        if not isinstance(c, torch.Tensor) and x.device.type == "cuda":
            return 2
        return 1

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, found {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, found {x.dtype}")
        if self.is_channel_first:
            if x.ndim < 3 or x.shape[1] != self.dim:
                raise ValueError(f"expected a channel-first input (b, {self.dim}, ...), found shape {tuple(x.shape)}")
        elif x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected an input of shape (b, n, {self.dim}), found {tuple(x.shape)}")

    def _quantize_torch(self, x: torch.Tensor, cut: int | None):
        """vqp's stage loop, op for op, on channel-last ``x (b, n, d)`` (after ``project_in``).

        Returns ``(quantized_out (b, n, d), indices (b, n, q))``.
        """
        c = self.soft_clamp_input_value
        if c is not None:
            x = (x / c).tanh() * c
        quantized_out, residual, all_indices = 0.0, x, []
        if cut is not None:
            null_indices = torch.full(x.shape[:2], -1.0, device=x.device, dtype=torch.long)
        lv = self._levels.to(x.device)
        with torch.autocast("cuda", enabled=False):
            for s, scale in enumerate(self.scales):
                if cut is not None and s > cut:
                    all_indices.append(null_indices)
                    continue
                codes, indices = self._stage_torch(residual / scale, lv)
                quantized = codes * scale
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
        return quantized_out, torch.stack(all_indices, dim=-1)

    def _stage_torch(self, z: torch.Tensor, lv: torch.Tensor):
        """One vqp ``FSQ`` stage (no projections, one codebook) on ``z (b, n, d)``: ``(codes, indices)``."""
        orig_dtype = z.dtype
        force_f32 = self.force_quantization_f32
        context = torch.autocast("cuda", enabled=False) if force_f32 else nullcontext()
        with context:
            if force_f32 and orig_dtype not in self.allowed_dtypes:
                z = z.float()
            basis = self._basis.to(z.device)
            if self._kind == "tanh_shift":
                half_l, offset, shift, half_width = _reference_constants(lv)
                codes = _round_ste((z + shift).tanh() * half_l - offset) / half_width
                level = codes * half_width + half_width
            else:
                levels_minus_1 = lv - 1
                bounded = z.tanh() if self._kind == "sym_tanh" else torch.clamp(z, min=-1.0, max=1.0)
                bracket = _floor_ste((levels_minus_1 * (bounded + 1) / 2.0) + 0.5)
                codes = (2.0 / levels_minus_1) * bracket - 1.0
                level = (codes + 1.0) / (2.0 / levels_minus_1)
            index = (level * basis).sum(dim=-1)
            index = torch.where(index.isnan(), -1, index.round()).to(torch.int32)  # NaN token: -1 (vqp: arbitrary)
            codes = codes.to(orig_dtype)
        return codes, index

    def _quantize_fused(self, ops, feature: torch.Tensor, channels_last: bool, cut: int | None, mode: int, groups: int = 1,
                        projection=None, project_in=None):
        """The fused kernel on the feature view ``(b, g*d, n)``: ``(out (b, g*d, n) float32, indices (g, b, n, q))``;
        with ``projection = (w_out (g * dim, d), b_out or None)``, ``project_out`` fused: ``(proj (b, n, g * dim),
        out, indices)``; with ``project_in = (w_in (g*d, dim), b_in or None)`` too, ``feature`` is the input
        ``(b, g * dim, n)``: ``(proj, h, out, indices)``."""
        tables = self._tables(feature.device)
        num_active = self.num_quantizers if cut is None else cut + 1
        kind = _ops.KINDS[self._kind]
        if project_in is not None:
            return ops.ResidualProjectInOutFunction.apply(feature, tables.stages, tables.guess, tables.channels,
                                                          tables.basis, *project_in, *projection, groups, num_active,
                                                          kind, mode, channels_last)
        if projection is not None:
            return ops.ResidualProjectedFunction.apply(feature, tables.stages, tables.guess, tables.channels,
                                                       tables.basis, *projection, groups, num_active, kind, mode,
                                                       channels_last)
        return ops.ResidualFSQFunction.apply(feature, tables.stages, tables.guess, tables.channels, tables.basis, groups,
                                             num_active, kind, mode, channels_last)

    def _soft_clamp_runs_in_kernel(self, device: torch.device) -> bool:
        """``soft_clamp_in_kernel``, whose default (None) is: in the kernel wherever it gives torch's indices and
        outputs on ``device`` (see the attribute)."""
        in_kernel = self.soft_clamp_in_kernel
        if in_kernel is not None:
            return bool(in_kernel)
        if device.type != "cuda":
            return True
        # a Python float c (pre-1.26): torch's CUDA division by it multiplies by its float32 reciprocal
        mode = _ops.SOFT_DIVIDE if isinstance(self.soft_clamp_input_value, torch.Tensor) else _ops.SOFT_RECIPROCAL
        return self._soft_clamp_flush_safe and _ops.soft_clamp_matches_torch(device, self._soft_clamp_key, mode)

    def _kernel_takes(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the kernel reproduces vqp's stages on values of ``dtype`` (``x``: the input, for its device): not
        float64 (vqp quantizes it in float64), a scalar soft clamp in half precision, or a module cast to half
        precision (.half(), .to(bfloat16): vqp's scales buffer follows, and its stages then compute in half)."""
        return (dtype in (torch.float32, torch.bfloat16, torch.float16) and self.scales.dtype == torch.float32
                and self._soft_clamp_mode(x, dtype) is not None)

    def _use_fused(self, x: torch.Tensor):
        """``(ops, soft clamp mode, x)`` for the fused kernel, or ``(None, None, x)`` for the torch path.

        Where the soft clamp runs outside the kernel (``soft_clamp_in_kernel``: False, or None where the device's
        check or the flush guard says so: :meth:`_soft_clamp_runs_in_kernel`), it runs here in torch ops (three more
        passes over ``x``) and the kernel gets the clamped values, so the indices are vqp's bit for bit there too.
        """
        ops = self._triton_ops(x)
        if ops is None or _transformed() or not self._kernel_takes(x, x.dtype):
            return None, None, x
        mode = self._soft_clamp_mode(x)
        if mode != 0 and not self._soft_clamp_runs_in_kernel(x.device):
            c = self.soft_clamp_input_value
            x, mode = (x / c).tanh() * c, 0
        return ops, mode, x

    def _fused_project_out(self, x: torch.Tensor):
        """``(weight, bias)`` for the kernel's fused ``project_out``, in the dtype ``self.project_out(quantized)``
        would compute in, or None where the module must be called: no projections, ``project_out`` replaced,
        subclassed or hooked (:func:`fsq_triton.module._is_plain`), ``dim`` not a multiple of 16 (every usual width
        is; the fused tile would spill), or weights in half precision outside autocast
        (there vqp's ``project_out`` receives the float32 quantized sum, and the call must raise as vqp's does).
        Under autocast on ``x``'s device, ``nn.Linear`` runs in the autocast dtype: so do the weights here."""
        linear = self.project_out
        if not self.has_projections or not _is_plain(linear, nn.Linear) or linear.weight.shape != (self.dim, self.codebook_dim):
            return None
        if self.dim % 16 != 0:  # the kernel's tile needs aligned rows of the output (ops.residual._projected_tile)
            return None
        weight, bias = linear.weight, linear.bias
        device_type = x.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            # autocast casts float32 and half-precision weights, not float64 ones (nn.Linear then raises: called)
            if any(t is not None and t.dtype not in _AUTOCAST_CAST for t in (weight, bias)):
                return None
            dtype = torch.get_autocast_dtype(device_type)
            return weight.to(dtype), None if bias is None else bias.to(dtype)
        if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            return None
        return weight, bias

    def _fused_projections(self, x: torch.Tensor):
        """``(ops, soft clamp mode, (w_in, b_in), (w_out, b_out))`` when :attr:`fuse_project_in` puts both
        projections in the kernel for this input, else None."""
        if not self.fuse_project_in or not self.has_projections:
            return None
        ops = self._triton_ops(x)
        out = self._fused_project_out(x) if ops is not None and not _transformed() else None
        linear = self.project_in
        if out is None or not _is_plain(linear, nn.Linear) or linear.weight.shape != (self.codebook_dim, self.dim):
            return None
        weight, bias = linear.weight, linear.bias
        if any(t is not None and t.dtype not in _AUTOCAST_CAST for t in (weight, bias)):
            return None
        if weight.dtype != out[0].dtype:  # float32 weights: autocast casts both alike
            weight, bias = weight.to(out[0].dtype), None if bias is None else bias.to(out[0].dtype)
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not self._kernel_takes(x, weight.dtype):
            return None
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return None  # nn.Linear raises for mixed dtypes: the module call says so
        return ops, self._soft_clamp_mode(x, weight.dtype), (weight, bias), out

    def forward(self, x: torch.Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed=None):
        self._check_input(x)
        if self.is_channel_first:
            x = rearrange(x, "b d ... -> b ... d")
            x, ps = pack([x], "b * d")
        both = self._fused_projections(x)
        if both is None:
            x = self.project_in(x)
        cut = self._dropout_cut(x, rand_quantize_dropout_fixed_seed)
        if both is not None:  # fuse_project_in: x is the input, project_in runs in the kernel
            ops, mode, project_in, projection = both
            x_fused = x
        else:
            ops, mode, x_fused = self._use_fused(x)
            project_in, projection = None, (self._fused_project_out(x) if ops is not None else None)
        if projection is not None:  # the stages and project_out (and project_in) in one launch
            quantized_out, *_, indices = self._quantize_fused(ops, x_fused.transpose(1, 2), True, cut, mode,
                                                              projection=projection, project_in=project_in)
            all_indices = indices[0]
        elif ops is not None:
            out, indices = self._quantize_fused(ops, x_fused.transpose(1, 2), True, cut, mode)
            quantized_out, all_indices = out.transpose(1, 2), indices[0]
        else:
            quantized_out, all_indices = self._quantize_torch(x, cut)
        if ops is not None and cut is not None and cut < self.num_quantizers - 1:
            all_indices = all_indices.long()  # vqp stacks int32 indices with int64 null indices

        if projection is None:
            quantized_out = self.project_out(quantized_out)
        if self.is_channel_first:
            quantized_out, = unpack(quantized_out, ps, "b * d")
            all_indices, = unpack(all_indices, ps, "b * d")
            quantized_out = rearrange(quantized_out, "b ... d -> b d ...")
            all_indices = rearrange(all_indices, "b ... d -> b d ...")
        ret = (quantized_out, all_indices)
        if not return_all_codes:
            return ret
        return (*ret, self.get_codes_from_indices(all_indices))


class GroupedResidualFSQ(nn.Module):
    """``groups`` residual FSQs side by side on chunks of the feature dim, a drop-in for vqp's ``GroupedResidualFSQ``.

    ``forward(x, return_all_codes=False)`` returns ``(quantized, indices (g, b, n, q))`` and with ``return_all_codes``
    a tuple of each group's codes. On the Triton path every group's stages run in the same launch (each group's
    ``project_in`` is its own ``nn.Linear``, as in vqp, before it; every group's ``project_out`` runs in it, the
    weights stacked, where each may be fused).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, found {groups!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or dim % groups != 0:
            raise ValueError(f"dim ({dim!r}) must be a positive int divisible by groups ({groups})")
        self.dim, self.groups = dim, groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList([ResidualFSQ(dim=dim // groups, **kwargs) for _ in range(groups)])
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def _check_group_indices(self, indices):
        if isinstance(indices, torch.Tensor) and indices.shape[0] != self.groups or \
                not isinstance(indices, torch.Tensor) and len(indices) != self.groups:
            raise ValueError(f"indices must hold one entry per group ({self.groups}) in their first axis")

    def get_codes_from_indices(self, indices):
        self._check_group_indices(indices)
        return torch.stack(tuple(rvq.get_codes_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices):
        self._check_group_indices(indices)
        outputs = tuple(rvq.get_output_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices))
        return torch.cat(outputs, dim=self.split_dim)

    def forward(self, x: torch.Tensor, return_all_codes: bool = False):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, found {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        split_dim = self.split_dim
        if x.ndim < 2 or x.shape[split_dim] != self.dim:
            raise ValueError(f"expected dim {self.dim} at axis {split_dim} of x, found shape {tuple(x.shape)}")
        first = self.rvqs[0]
        # One seed for every group, drawn (and all-reduced) only when quantize dropout applies. vqp draws it on every
        # training-mode forward: a rank that runs one more (a no_grad sample, a log) then waits forever in all_reduce
        # (vqp issues #198, #105).
        seed = get_maybe_sync_seed(x.device) if first._dropout_applies() else None
        one_launch = self._fused_layout(x)
        both = self._fused_projections(x) if one_launch else None
        ops = first._triton_ops(x) if one_launch and both is None and not _transformed() else None
        if ops is not None and not first._kernel_takes(x, self._projected_dtype(x)):
            ops = None  # decided before project_in runs: the per-group fallback below calls it (once)
        if both is not None:  # fuse_project_in: x itself is the kernel's input, as (b, g * dim_per_group, n)
            ops, mode, project_in, projection = both
            feature = x.reshape(x.shape[0], self.dim, -1) if first.is_channel_first else x.transpose(1, 2)
            cut = first._dropout_cut(x, seed)
            q, _, _, indices = first._quantize_fused(ops, feature, False, cut, mode, groups=self.groups,
                                                     projection=projection, project_in=project_in)
            return self._grouped_result(x, q, indices, cut, return_all_codes)
        if ops is not None:  # x as (b, n, g, dim_per_group)
            if first.is_channel_first:
                xs = rearrange(x, "b (g e) ... -> b (...) g e", g=self.groups)
            else:
                xs = rearrange(x, "b n (g e) -> b n g e", g=self.groups)
            if first.has_projections:  # each group's own nn.Linear, as vqp (bit for bit), into one (b, n, g, d) tensor,
                # on the input vqp gives it: channel-first, a contiguous copy (einops.pack concatenates); a strided
                # view rounds differently in bfloat16 on the CPU (7 of 216 indices moved under autocast)
                parts = [xs[:, :, i].contiguous() if first.is_channel_first else xs[:, :, i] for i in range(self.groups)]
                xs = torch.stack([rvq.project_in(part) for rvq, part in zip(self.rvqs, parts)], dim=2)
            ops, mode, xs = first._use_fused(xs)
        if ops is None:  # group by group, each on its own path (vqp's loop)
            chunks = x.chunk(self.groups, dim=split_dim)
            out = tuple(rvq(chunk, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
                        for rvq, chunk in zip(self.rvqs, chunks))
            quantized, all_indices, *maybe_all_codes = tuple(zip(*out))
            return (torch.cat(quantized, dim=split_dim), torch.stack(all_indices), *maybe_all_codes)

        # every group in one launch
        cut = first._dropout_cut(xs, seed)
        feature = rearrange(xs, "b n g d -> b (g d) n")
        projection = self._fused_project_out(xs)
        if projection is not None:  # every group's project_out in the same launch, the weights stacked
            q, _, indices = first._quantize_fused(ops, feature, False, cut, mode, groups=self.groups,
                                                  projection=projection)
        else:
            out, indices = first._quantize_fused(ops, feature, False, cut, mode, groups=self.groups)
            q = rearrange(out, "b (g d) n -> b n g d", g=self.groups)
            if first.has_projections:
                q = torch.stack([rvq.project_out(q[:, :, i]) for i, rvq in enumerate(self.rvqs)], dim=2)
            q = rearrange(q, "b n g e -> b n (g e)")
        return self._grouped_result(x, q, indices, cut, return_all_codes)

    def _projected_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype each group's ``project_in`` gives (``x``'s without projections): autocast's where it casts the
        weights, else the weights'."""
        first = self.rvqs[0]
        if not first.has_projections:
            return x.dtype
        weight = getattr(first.project_in, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return x.dtype
        if torch.is_autocast_enabled(x.device.type) and weight.dtype in _AUTOCAST_CAST:
            return torch.get_autocast_dtype(x.device.type)
        return weight.dtype

    def _grouped_result(self, x, q, indices, cut, return_all_codes: bool):
        """The fused launch's ``q (b, n, g * e)`` and ``indices (g, b, n, q)`` in ``x``'s layout, as vqp returns them."""
        first, b = self.rvqs[0], x.shape[0]
        if cut is not None and cut < first.num_quantizers - 1:
            indices = indices.long()
        if first.is_channel_first:
            spatial = x.shape[2:]
            quantized = rearrange(q, "b n e -> b e n").reshape(b, self.dim, *spatial)
            indices = rearrange(indices, "g b n q -> g b q n").reshape(self.groups, b, first.num_quantizers, *spatial)
        else:
            quantized = q
        ret = (quantized, indices)
        if return_all_codes:
            ret = (*ret, tuple(rvq.get_codes_from_indices(idx) for rvq, idx in zip(self.rvqs, indices)))
        return ret

    def _fused_project_out(self, x: torch.Tensor):
        """Every group's fused ``project_out`` (:meth:`ResidualFSQ._fused_project_out`) stacked into one
        ``(weight (dim, d), bias or None)`` (each group's ``(dim / g, d)`` stacked) for the launch, or None where any
        group's must be called."""
        return _stacked([rvq._fused_project_out(x) for rvq in self.rvqs])

    @property
    def fuse_project_in(self) -> bool:
        """:attr:`ResidualFSQ.fuse_project_in` of every group (setting it sets each group's)."""
        return all(rvq.fuse_project_in for rvq in self.rvqs)

    @fuse_project_in.setter
    def fuse_project_in(self, value: bool) -> None:
        for rvq in self.rvqs:
            rvq.fuse_project_in = bool(value)

    def _fused_projections(self, x: torch.Tensor):
        """Every group's :meth:`ResidualFSQ._fused_projections` stacked for the one launch (``(ops, mode, (w_in
        (g*d, dim / g), b_in), (w_out (dim, d), b_out))``), or None unless every group's may run fused."""
        parts = [rvq._fused_projections(x) for rvq in self.rvqs]
        if any(p is None for p in parts) or len({p[1] for p in parts}) != 1:
            return None
        ins, outs = _stacked([p[2] for p in parts]), _stacked([p[3] for p in parts])
        if ins is None or outs is None or ins[0].dtype != outs[0].dtype:
            return None
        return parts[0][0], parts[0][1], ins, outs

    def _fused_layout(self, x) -> bool:
        """Whether the groups can share one launch: the chunks are the feature axis each group's stages read."""
        if self.rvqs[0].is_channel_first:
            return self.accept_image_fmap and x.ndim >= 3
        return not self.accept_image_fmap and x.ndim == 3
