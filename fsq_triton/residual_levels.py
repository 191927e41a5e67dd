"""Residual FSQ: the per-stage calibration that lets one kernel run every stage without ``tanh``.

Shape letters: ``q`` stages (``num_quantizers``), ``d`` channels (``len(levels)``), ``L = L_j`` the levels of
channel ``j``.

vector-quantize-pytorch's ``ResidualFSQ`` runs, for stage ``s`` with per-channel scale ``scale_s``, on the residual
``r`` (float32, because ``scale_s`` is a float32 tensor)::

    z         = r / scale_s
    level     = f(z)                     one of three stage quantizers below
    quantized = code(level) * scale_s
    r         = r - quantized            (next stage's residual)

The stage quantizers (``StageKind``), op for op as vqp writes them:

- ``"tanh_shift"`` (vqp < 1.26, ``preserve_symmetry=False``): ``level = round(tanh(z + shift) * half_l - offset) + L // 2``,
  ``code = (level - L // 2) / (L // 2)``; the constants are those of :mod:`fsq_triton.levels`.
- ``"sym_tanh"`` (vqp >= 1.26 with ``bound_hard_clamp=False``, or < 1.26 with ``preserve_symmetry=True``):
  ``level = floor((L - 1) * (tanh(z) + 1) / 2 + 0.5)``, ``code = 2 / (L - 1) * level - 1``.
- ``"sym_clamp"`` (vqp >= 1.26 default, ``bound_hard_clamp=True``): as ``"sym_tanh"`` with ``clamp(z, -1, 1)``.

Each ``level`` is a monotone step function of ``r`` (``scale_s > 0``), so its ``L - 1`` step positions in residual
space are found by bisection over float32 bit patterns (:func:`fsq_triton.levels._bisect_first_true`), evaluating
vqp's own op sequence in torch on the device. The kernel then counts thresholds and selects
``quantized = code(level) * scale_s`` from a table built with the same float32 ops, so a stage is exact with no
division and no ``tanh``. The straight-through gradient of ``"sym_clamp"`` passes where ``-1 <= z <= 1``; that
mask is two more thresholds in residual space (``clamp_lo <= r < clamp_hi``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .levels import calibration_device, cached_calibration, _bisect_first_true, _reference_constants, basis_of, bound_code, bound_level

STAGE_KINDS = ("tanh_shift", "sym_tanh", "sym_clamp")

# Columns of ResidualTables.stages (float32, (q, d, 3 + 2 * max(L) - 1)); the kernel reads the same.
COL_SCALE, COL_CLAMP_LO, COL_CLAMP_HI, COL_THRESHOLDS = range(4)
# Columns of ResidualTables.channels (float32, (d, CHANNEL_COLS)).
COL_SHIFT, COL_GRAD_K, COL_SOFT_CLAMP, COL_SOFT_CLAMP_INV = range(4)
CHANNEL_COLS = 4


def stage_scales(levels: tuple[int, ...], num_quantizers: int, semantics: str) -> torch.Tensor:
    """vqp's ``scales`` buffer (q, d) float32, by vqp's own ops on the CPU (where vqp builds it).

    vqp >= 1.26: ``tensor(levels).float() ** -s``; vqp < 1.26: ``(torch.Tensor(levels) - 1) ** -s``.
    """
    if semantics == "pre-1.26":
        levels_tensor = torch.Tensor(list(levels))
        return torch.stack([(levels_tensor - 1) ** -ind for ind in range(num_quantizers)])
    levels_tensor = torch.tensor(list(levels))
    return torch.stack([levels_tensor.float() ** -ind for ind in range(num_quantizers)])


def stage_level(z: torch.Tensor, kind: str, lv: torch.Tensor, channel: torch.Tensor | None = None) -> torch.Tensor:
    """The stage quantizer's integer level (as float) of ``z`` (already divided by the stage scale), vqp's ops.

    ``lv`` is the int32 levels tensor broadcast against ``z``'s last dim, or the ``(d,)`` levels with ``channel``
    naming each element's channel (constants computed on ``(d,)`` and gathered, as vqp computes them). The plain
    FSQ's bounds of the same names (:func:`fsq_triton.levels.bound_level`).
    """
    return bound_level(z, kind, lv, channel)


def stage_code(level: torch.Tensor, kind: str, lv: torch.Tensor) -> torch.Tensor:
    """The code of an integer level, vqp's forward value (``round_ste``/``floor_ste`` give the integer exactly)."""
    return bound_code(level, kind, lv)


@dataclass(frozen=True)
class ResidualTables:
    """Calibrated constants of one residual FSQ configuration on one device.

    ``stages`` (q, d, 3 + 2 * max(L) - 1) float32, by column: ``scale`` (vqp's ``scales[s, j]``), ``clamp_lo`` and
    ``clamp_hi`` (``"sym_clamp"``'s gradient passes where ``clamp_lo <= r < clamp_hi``; -inf/+inf otherwise), the
    ``max(L) - 1`` thresholds (``level_s(r) = #{k : r >= thr[s, j, k]}``, NaN padding), and the ``max(L)`` scaled
    codes ``quantized[s, j, k] = code(k) * scale[s, j]`` (float32 ops as vqp; zero padding).
    ``channels`` (d, 4) float32: ``shift`` (the tanh argument's shift of ``"tanh_shift"``, 0 otherwise), ``grad_k``
    (d code / d bounded value, times d bounded / d tanh: the straight-through gradient's constant), ``soft_clamp``
    (the soft clamp value ``c_j``, NaN without soft clamp) and ``soft_clamp_inv`` (``1 / c_j`` in float32).
    ``basis`` (d,) int32.
    """

    stages: torch.Tensor
    channels: torch.Tensor
    basis: torch.Tensor
    kind: str

    @property
    def max_level(self) -> int:
        return (self.stages.shape[2] - COL_THRESHOLDS + 1) // 2

    @property
    def scales(self) -> torch.Tensor:
        return self.stages[:, :, COL_SCALE]

    @property
    def thresholds(self) -> torch.Tensor:
        return self.stages[:, :, COL_THRESHOLDS : COL_THRESHOLDS + self.max_level - 1]

    @property
    def quantized(self) -> torch.Tensor:
        return self.stages[:, :, COL_THRESHOLDS + self.max_level - 1 :]


def _build(levels: tuple[int, ...], num_quantizers: int, semantics: str, kind: str, soft_clamp, device) -> ResidualTables:
    q, d, max_level = num_quantizers, len(levels), max(levels)
    lv = torch.tensor(levels, dtype=torch.int32, device=device)
    scales = stage_scales(levels, q, semantics).to(device)

    # One predicate per (stage s, channel j, level k >= 1): "level_s(r) >= k".
    n_pred = q * d * (max_level - 1)
    flat = torch.arange(n_pred, device=device)
    stage, chan, k = flat // (d * (max_level - 1)), (flat // (max_level - 1)) % d, flat % (max_level - 1) + 1
    valid = k < lv[chan]
    target = torch.where(valid, k, torch.ones_like(k))  # padding predicates ask for level 1, then become NaN
    scale_of = scales[stage, chan]

    def level_at_least(r):
        return stage_level(r / scale_of, kind, lv, chan) >= target

    thresholds = _bisect_first_true(level_at_least, n_pred, device)
    thresholds = torch.where(valid, thresholds, float("nan")).reshape(q, d, max_level - 1)

    k_all = torch.arange(max_level, device=device, dtype=torch.float32)
    lv_col = lv[:, None]
    codes = stage_code(k_all[None, :], kind, lv_col)                          # (d, max_level)
    codes = torch.where(k_all[None, :] < lv_col, codes, 0.0)
    quantized = codes[None, :, :] * scales[:, :, None]                       # vqp: quantized * scale

    if kind == "sym_clamp":  # gradient mask -1 <= r / scale <= 1 as r-thresholds
        scale_flat = scales.reshape(-1)
        clamp_lo = _bisect_first_true(lambda r: r / scale_flat >= -1.0, q * d, device).reshape(q, d)
        clamp_hi = _bisect_first_true(lambda r: r / scale_flat > 1.0, q * d, device).reshape(q, d)
    else:
        clamp_lo = torch.full((q, d), float("-inf"), device=device)
        clamp_hi = torch.full((q, d), float("inf"), device=device)

    stages = torch.cat([scales[:, :, None], clamp_lo[:, :, None], clamp_hi[:, :, None], thresholds, quantized], dim=2)

    if kind == "tanh_shift":
        half_l, _offset, shift, half_width = _reference_constants(lv)
        grad_k = half_l / half_width
    else:
        shift = torch.zeros(d, device=device)
        grad_k = (2.0 / (lv - 1)) / 2.0 * (lv - 1)  # code = 2/(L-1) * ((L-1) * (t + 1) / 2 + 0.5) - 1
    if soft_clamp is None:
        soft = soft_inv = torch.full((d,), float("nan"), device=device)
    else:  # soft_inv: 1 / c as torch's CUDA division by a Python float computes it (float32 reciprocal)
        soft = soft_clamp.to(device, torch.float32).expand(d)
        soft_inv = 1.0 / soft
    basis = basis_of(levels).to(device)
    channels = torch.stack([shift.float(), grad_k.float(), soft, soft_inv], dim=1)
    return ResidualTables(stages.float().contiguous(), channels.contiguous(), basis.contiguous(), kind)


_TABLES: dict[tuple, ResidualTables] = {}


def residual_tables(
    levels: tuple[int, ...], num_quantizers: int, semantics: str, kind: str, device: torch.device | str,
    soft_clamp: tuple[float, ...] | None = None,
) -> ResidualTables:
    """The calibrated :class:`ResidualTables`, cached per (levels, num_quantizers, semantics, kind, soft clamp, device).

    ``soft_clamp``: the soft clamp value as float32-representable Python floats (one, or one per channel), or None.
    """
    device = calibration_device(device)
    soft_key = None if soft_clamp is None else tuple(float(v) for v in soft_clamp)
    key = (tuple(levels), int(num_quantizers), semantics, kind, soft_key, str(device))

    def build():
        soft = None if soft_key is None else torch.tensor(soft_key, dtype=torch.float32)
        return _build(tuple(levels), int(num_quantizers), semantics, kind, soft, device)

    return cached_calibration(_TABLES, key, f"residual tables of levels {list(levels)}", device, build)
