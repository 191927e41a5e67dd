"""Levels: validation, and the per-level constants that every path uses, in one place.

An FSQ codebook is the product grid of ``levels = (L_0, ..., L_{d-1})``. For channel ``i`` with
``L = L_i`` the reference computes, in float32 torch ops from an int32 ``levels`` tensor:

    half_l     = (L - 1) * (1 + eps) / 2          eps = 1e-3
    offset     = 0.5 if L is even else 0.0
    shift      = atanh(offset / half_l)
    half_width = L // 2
    basis      = exclusive cumulative product of levels (int32)

and quantizes ``q = round(tanh(z + shift) * half_l - offset)``, ``code = q / half_width``.

The Triton forward never evaluates ``tanh``: ``level(z) = q(z) + half_width`` is a monotone step
function of ``z``, so its ``L - 1`` step positions (``thresholds``) are found once per (levels,
device) by bisection over the ordered float32 bit patterns, evaluating the reference's own torch
ops on that device. The kernel then counts the thresholds at or below ``z`` and selects the code
from a table computed with IEEE division. That reproduces the reference bit for bit on the device
it was calibrated on (``tanh`` differs between devices, so calibration is per device). The zero code
is always ``+0.0``, as in the reference, whose ``x + (round(x) - x)`` turns ``-0.0`` into ``+0.0``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

EPS = 1e-3
INT32_MAX = 2**31 - 1

# float32 bit patterns of -inf and +inf, as ordered integer keys (see _key_to_float32)
_KEY_NEG_INF = -0x7F800000 - 1
_KEY_POS_INF = 0x7F800000


def validate_levels(levels: object, check_codebook_size: bool = True) -> tuple[int, ...]:
    """Check ``levels`` and return it as a tuple of Python ints.

    Raises ``TypeError`` for something that is not a sequence of integers and ``ValueError`` for
    an empty sequence, a level below 2, a level so large that the reference's tanh bound lets the
    rounded value escape its ``L`` levels, or (with ``check_codebook_size``, when indices are returned) a
    codebook (``prod(levels)``) beyond int32.
    """
    if isinstance(levels, torch.Tensor):
        if levels.is_floating_point() or levels.is_complex() or levels.dtype == torch.bool:
            raise TypeError(f"levels must hold integers, found a tensor of dtype {levels.dtype}")
        if levels.ndim != 1:
            raise ValueError(f"levels must be one-dimensional, found a tensor of shape {tuple(levels.shape)}")
        levels = levels.tolist()
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"levels must be a list or tuple of integers, found {type(levels).__name__}")
    if len(levels) == 0:
        raise ValueError("levels must not be empty: FSQ needs at least one channel")
    out = []
    for i, level in enumerate(levels):
        if isinstance(level, bool) or not isinstance(level, numbers.Integral):
            raise TypeError(
                f"levels[{i}] must be an integer, found {level!r} of type {type(level).__name__}"
            )
        level = int(level)
        if level < 2:
            raise ValueError(f"levels[{i}] must be at least 2 (a channel needs two levels), found {level}")
        out.append(level)
    codebook_size = 1
    for level in out:
        codebook_size *= level
    if check_codebook_size and codebook_size > INT32_MAX:
        raise ValueError(
            f"the codebook size prod(levels) = {codebook_size} exceeds the int32 range "
            f"({INT32_MAX}) in which indices are returned; use fewer or smaller levels, or several codebooks"
        )
    levels_t = torch.tensor(out, dtype=torch.int32)
    half_l, offset, _shift, half_width = _reference_constants(levels_t)
    top = torch.round(half_l - offset) + half_width  # level reached at z = +inf (tanh = 1)
    bad = [(lv, int(t)) for lv, t in zip(out, top.tolist()) if t > lv - 1]
    if bad:
        level, reached = bad[0]
        raise ValueError(
            f"level {level} is too large: the reference bound tanh(z + shift) * (L - 1) * (1 + eps) / 2 "
            f"rounds to level index {reached} at z = +inf, outside [0, {level - 1}]; levels up to 1000 stay in range"
        )
    return tuple(out)


def _reference_constants(levels: torch.Tensor, eps: float = EPS):
    """The reference's per-level float32 constants, by its own torch ops on ``levels``' device."""
    half_l = (levels - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    half_width = levels // 2
    return half_l, offset, shift, half_width


def reference_bound(z: torch.Tensor, levels: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``tanh(z + shift) * half_l - offset``: the reference's ``bound``, op for op (broadcast on the last dim)."""
    half_l, offset, shift, _ = _reference_constants(levels, eps)
    return (z + shift).tanh() * half_l - offset


def basis_of(levels: Sequence[int]) -> torch.Tensor:
    """Exclusive cumulative product of ``levels`` (int32), as the reference computes it."""
    return torch.cumprod(torch.tensor([1] + list(levels[:-1])), dim=0, dtype=torch.int32)


def _key_to_float32(key: torch.Tensor) -> torch.Tensor:
    """Inverse of the ordering ``float32 -> int64`` key: keys are ordered as the floats they stand for.

    Non-negative floats keep their bit pattern; a negative float ``-x`` (bits ``0x80000000 | b``)
    maps to ``-b - 1``, so ``-0.0`` sits at ``-1`` just below ``+0.0`` at ``0``.
    """
    bits = torch.where(key >= 0, key, (-(key + 1)) | 0x80000000)
    return bits.to(torch.int32).view(torch.float32) if bits.dtype != torch.int32 else bits.view(torch.float32)


def _bisect_first_true(predicate, n: int, device: torch.device) -> torch.Tensor:
    """For ``n`` monotone predicates over float32 (False below, True above), the first True value each.

    ``predicate(values)`` takes a float32 tensor of shape ``(n,)`` and returns a bool tensor of shape ``(n,)``;
    it must be False at ``-inf`` and True at ``+inf``.
    """
    lo = torch.full((n,), _KEY_NEG_INF, dtype=torch.int64, device=device)
    hi = torch.full((n,), _KEY_POS_INF, dtype=torch.int64, device=device)
    for _ in range(34):  # the key range spans 2**32 values
        mid = lo + (hi - lo) // 2
        ok = predicate(_key_to_float32(mid))
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return _key_to_float32(hi)


# Columns of LevelTables.values (float32) and LevelTables.integers (int32); the kernels read the same.
(COL_SHIFT, COL_HALF_L, COL_OFFSET, COL_GRAD_SCALE, COL_CLAMP_LO, COL_CLAMP_HI, COL_SMOOTH, COL_BOUND,
 COL_THRESHOLDS) = range(9)
COL_BASIS, COL_NUM_LEVELS, COL_HALF_WIDTH = range(3)

# The bound variants of vector-quantize-pytorch 1.32's FSQ (``preserve_symmetry`` x ``bound_hard_clamp``), each a
# different calibration of the same tables (the kernels never see which):
#   "tanh_shift":  level = round(tanh(z + shift) * half_l - offset) + hw,   shift = atanh(offset / half_l)   (reference)
#   "clamp_shift": level = round(clamp(z + shift, -1, 1) * half_l - offset) + hw,   shift = offset / half_l
#   "sym_tanh":    level = floor((L - 1) * (tanh(z) + 1) / 2 + 0.5)        (preserve_symmetry)
#   "sym_clamp":   level = floor((L - 1) * (clamp(z, -1, 1) + 1) / 2 + 0.5)
# code = (level - hw) / hw for the first two, 2 / (L - 1) * level - 1 for the symmetric ones.
BOUNDS = ("tanh_shift", "clamp_shift", "sym_tanh", "sym_clamp")


def bound_kind(preserve_symmetry: bool, hard_clamp: bool) -> str:
    """The :data:`BOUNDS` entry of vqp's ``preserve_symmetry`` and ``bound_hard_clamp`` options."""
    return ("sym_" if preserve_symmetry else "") + ("clamp" if hard_clamp else "tanh") + ("" if preserve_symmetry else "_shift")


def bound_constants(levels: torch.Tensor, bound: str, eps: float = EPS):
    """``(half_l, offset, shift, half_width)`` of a shifted bound by vqp's ops (``shift`` without ``atanh`` for the
    hard clamp); for the symmetric bounds the shift is 0 (``half_l``, ``offset`` stay the reference's, unused)."""
    half_l, offset, shift, half_width = _reference_constants(levels, eps)
    if bound == "clamp_shift":
        shift = offset / half_l
    elif bound in ("sym_tanh", "sym_clamp"):
        shift = torch.zeros_like(shift)
    return half_l, offset, shift, half_width


def bound_level(z: torch.Tensor, bound: str, levels: torch.Tensor, channel: torch.Tensor | None = None) -> torch.Tensor:
    """The integer level (as float) of ``z`` under ``bound``, by vqp 1.32's own ops (``levels`` int32, broadcast).

    ``channel`` (optional, broadcast against ``z``): the channel whose constants apply to each element. The constants
    are then computed on the ``(d,)`` levels tensor and gathered, as the reference computes them: ``atanh`` of a
    longer tensor takes another (vectorised) CPU path, which can differ by an ulp.
    """
    def per_element(t):
        return t if channel is None else t[channel]

    if bound in ("tanh_shift", "clamp_shift"):
        half_l, offset, shift, half_width = (per_element(t) for t in bound_constants(levels, bound))
        x = z + shift
        bounded = x.tanh() if bound == "tanh_shift" else torch.clamp(x, min=-1.0, max=1.0)
        return (bounded * half_l - offset).round() + half_width
    bounded = z.tanh() if bound == "sym_tanh" else torch.clamp(z, min=-1.0, max=1.0)
    return (((per_element(levels) - 1) * (bounded + 1) / 2.0) + 0.5).floor()


def bound_code(level: torch.Tensor, bound: str, levels: torch.Tensor) -> torch.Tensor:
    """The code of an integer level under ``bound`` (vqp's ``_scale_and_shift_inverse``, float32)."""
    if bound in ("tanh_shift", "clamp_shift"):
        half_width = levels // 2
        return (level - half_width) / half_width
    return (2.0 / (levels - 1)) * level - 1.0


def max_level_of(values: torch.Tensor) -> int:
    """``max(levels)`` from the width of a ``LevelTables.values`` table (the launchers receive only the tensor)."""
    return (values.shape[1] - COL_THRESHOLDS + 1) // 2


@dataclass(frozen=True)
class LevelTables:
    """Per-level constants of one codebook on one device: two small tensors, one row per channel ``j``.

    ``values`` (d, 8 + 2 * max(L) - 1) float32, by column:
      - ``shift``, ``half_l``, ``offset``: the bound's constants (the plain PyTorch path; ``shift`` is 0 for the
        symmetric bounds, ``offset / half_l`` for the shifted hard clamp);
      - ``grad_scale``: the backward's factor, d code / d bounded value (``half_l / half_width``, or
        ``2 / (L - 1) / 2 * (L - 1)`` for the symmetric bounds);
      - ``clamp_lo``, ``clamp_hi``: the gradient passes where ``clamp_lo <= z < clamp_hi`` (the hard clamps'
        ``-1 <= z + shift <= 1``; -inf and +inf for the tanh bounds);
      - ``smooth``: 1 for the tanh bounds (the gradient is scaled by ``sech^2(z + shift)``), 0 for the hard clamps;
      - ``bound``: the :data:`BOUNDS` position of the calibrated bound (a record; the kernels do not read it);
      - ``thresholds`` (max(L) - 1 columns): ``level(z) = #{k < L_j - 1 : z >= thresholds[j, k]}``;
        the columns past ``L_j - 1`` hold NaN, which no comparison passes (``+inf`` would count for ``z = +inf``);
      - ``codes`` (max(L) columns): ``codes[j, k] = (k - half_width_j) / half_width_j`` (IEEE division), or
        ``2 / (L_j - 1) * k - 1`` for the symmetric bounds (vqp's float32 ops).
    ``integers`` (d, 3) int32: ``basis``, ``num_levels``, ``half_width``.
    ``index_dtype``: a float dtype in which ``sum_j level_j * basis_j`` is exact (float32 for codebooks
    under 2**24, float64 otherwise); the PyTorch path reduces indices in it.
    ``bound``: the :data:`BOUNDS` entry the thresholds were calibrated for.
    """

    values: torch.Tensor
    integers: torch.Tensor
    index_dtype: torch.dtype = torch.float64
    bound: str = "tanh_shift"

    @property
    def max_level(self) -> int:
        return max_level_of(self.values)

    shift = property(lambda self: self.values[:, COL_SHIFT])
    half_l = property(lambda self: self.values[:, COL_HALF_L])
    offset = property(lambda self: self.values[:, COL_OFFSET])
    grad_scale = property(lambda self: self.values[:, COL_GRAD_SCALE])
    clamp_lo = property(lambda self: self.values[:, COL_CLAMP_LO])
    clamp_hi = property(lambda self: self.values[:, COL_CLAMP_HI])
    smooth = property(lambda self: self.values[:, COL_SMOOTH])
    thresholds = property(lambda self: self.values[:, COL_THRESHOLDS : COL_THRESHOLDS + self.max_level - 1])
    codes = property(lambda self: self.values[:, COL_THRESHOLDS + self.max_level - 1 :])
    basis = property(lambda self: self.integers[:, COL_BASIS])
    num_levels = property(lambda self: self.integers[:, COL_NUM_LEVELS])
    half_width = property(lambda self: self.integers[:, COL_HALF_WIDTH])


def _build_tables(levels: tuple[int, ...], device: torch.device, bound: str = "tanh_shift") -> LevelTables:
    d = len(levels)
    max_level = max(levels)
    lv = torch.tensor(levels, dtype=torch.int32, device=device)
    half_l, offset, shift, half_width = bound_constants(lv, bound)

    # One predicate per (channel j, level k >= 1): "level(z) >= k", by the bound's own ops.
    ks = torch.arange(1, max_level, device=device, dtype=torch.int32)
    chan = torch.arange(d, device=device).repeat_interleave(max_level - 1)
    k_flat = ks.repeat(d)
    valid = k_flat < lv[chan]
    # Padding predicates (k >= L_j) would never turn True; ask for level 1 and overwrite them with NaN.
    target = torch.where(valid, k_flat, torch.ones_like(k_flat))

    def level_at_least(z):
        return bound_level(z, bound, lv, chan) >= target

    thresholds = _bisect_first_true(level_at_least, chan.numel(), device)
    thresholds = torch.where(valid, thresholds, float("nan")).reshape(d, max_level - 1)
    k_all = torch.arange(max_level, device=device, dtype=torch.int32)
    if bound in ("tanh_shift", "clamp_shift"):
        codes = (k_all[None, :] - half_width[:, None]).to(torch.float32) / half_width[:, None]
        grad_scale = half_l / half_width
    else:
        codes = bound_code(k_all[None, :].to(torch.float32), bound, lv[:, None])
        grad_scale = (2.0 / (lv - 1)) / 2.0 * (lv - 1)  # d code / d bounded: 2/(L-1) * (L-1)/2, in vqp's order

    # The straight-through gradient passes where clamp_lo <= z < clamp_hi (the hard clamps: -1 <= z + shift <= 1,
    # as z-thresholds), scaled by sech^2(z + shift) for the tanh bounds (smooth = 1).
    smooth = bound in ("tanh_shift", "sym_tanh")
    if smooth:
        clamp_lo = torch.full((d,), float("-inf"), device=device)
        clamp_hi = torch.full((d,), float("inf"), device=device)
    else:
        clamp_lo = _bisect_first_true(lambda z: z + shift >= -1.0, d, device)
        clamp_hi = _bisect_first_true(lambda z: z + shift > 1.0, d, device)
    flags = torch.tensor([float(smooth), float(BOUNDS.index(bound))], device=device).expand(d, 2)

    columns = [shift, half_l, offset, grad_scale, clamp_lo, clamp_hi]
    values = torch.cat([torch.stack([c.to(torch.float32) for c in columns], dim=1), flags, thresholds, codes], dim=1)
    integers = torch.stack([basis_of(levels).to(device), lv, half_width.to(torch.int32)], dim=1)
    index_dtype = torch.float32 if math.prod(levels) < 2**24 else torch.float64
    return LevelTables(values.contiguous(), integers.contiguous(), index_dtype, bound)


# No lock: two threads that miss at once build the same tables, and either result may stay. (A lock would
# also stop torch.compile from tracing through a miss.)
_TABLES: dict[tuple[tuple[int, ...], str, str], LevelTables] = {}


def calibration_device(device: torch.device | str) -> torch.device:
    """``device`` as calibrations are cached by: a bare ``cuda`` names the current GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cached_calibration(cache: dict, key: tuple, what: str, device: torch.device, build):
    """``cache[key]``, built by ``build()`` on a miss. A miss while torch.compile traces is an error: calibration
    runs eager bisection, which must happen once, outside the traced graph."""
    tables = cache.get(key)
    if tables is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"fsq_triton: the {what} are not calibrated on {device} yet; move the module there (.to(device)) "
                "or run it once eagerly there before torch.compile traces it"
            )
        tables = cache[key] = build()
    return tables


def level_tables(levels: tuple[int, ...], device: torch.device | str, bound: str = "tanh_shift") -> LevelTables:
    """The calibrated :class:`LevelTables` of ``levels`` and ``bound`` (:data:`BOUNDS`) on ``device``, built once
    per process and cached."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, found {bound!r}")
    device = calibration_device(device)
    return cached_calibration(_TABLES, (tuple(levels), str(device), bound), f"level tables of levels {list(levels)}",
                              device, lambda: _build_tables(tuple(levels), device, bound))
