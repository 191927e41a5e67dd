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
vqp's own op sequence in torch on the device. ``level = #{k : r >= thr[k]}`` and
``quantized = code(level) * scale_s`` comes from a table built with the same float32 ops, so a stage is exact with no
division and no ``tanh``. The straight-through gradient of ``"sym_clamp"`` passes where ``-1 <= z <= 1``; that
mask is two more thresholds in residual space (``clamp_lo <= r < clamp_hi``).

Counting ``L - 1`` thresholds costs a compare and two selects each. The kernels instead locate ``r`` on a grid of
half levels with one multiply-add and correct with at most one threshold (:func:`guess_table`, which proves the
result equal to the count for every float, or turns the guess off for the configuration: the kernels then count).
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
    ``basis`` (d,) int32. ``guess`` (q, d, 1 + R, 4) float32: each stage's guess-and-correction table
    (:func:`guess_table`), or ``(0, d, 1 + R, 4)`` where the guess cannot be proven exact.
    """

    stages: torch.Tensor
    channels: torch.Tensor
    basis: torch.Tensor
    kind: str
    guess: torch.Tensor | None = None

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
    guess = guess_table(thresholds, quantized, lv, basis_of(levels).to(device))

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
    return ResidualTables(stages.float().contiguous(), channels.contiguous(), basis.contiguous(), kind, guess)


GUESS_MAGIC = 0x4A800000  # float32 bits of 2**22, whose float32 neighbours are 0.5 apart
GUESS_OFFSET = 2.0 ** 22
GUESS_MAX_ROWS = 256       # past this many rows a stage, the kernels keep the compare chain


def guess_table(thresholds: torch.Tensor, quantized: torch.Tensor, lv: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The guess-and-correction table of every stage, ``(q, d, 1 + R, 4)`` float32 on the tables' device, or an empty
    ``(0, d, 1 + R, 4)`` tensor where the guess cannot be proven exact (the kernels then count thresholds: the
    compare chain). ``R = 2 * max(L) - 3`` rows or more (as many as the widest stage needs).

    For stage ``s`` and channel ``j`` (``L = L_j``; ``thr[k]`` the ``k``-th threshold, 1-based, so that
    ``level(r) = #{k : r >= thr[k]}``), with ``u(r) = a * r + b`` the exact line (``a = 1 / min_k (thr[k+1] -
    thr[k])`` in float32, so consecutive thresholds lie at least 1 apart in ``u``; ``b`` a multiple of 1/2 that puts
    ``u(thr[1])`` within 1/4 of 0):

    - row 0: ``(a, 2**22 + b, 0, 0)`` (the sum is exact);
    - row ``1 + i`` for ``i = 0 .. R - 1``: ``(t_i, quantized[lo_i], quantized[lo_i + 1], lo_i * basis_j)`` (the
      last column the int32's bits), ``lo_i`` the number of thresholds surely below the band of ``i`` and ``t_i`` the
      one threshold that may fall in the band (NaN if none, which no comparison passes; then ``quantized[lo_i]``
      twice).

    The kernel computes ``i = clamp(bits(fl(r * a + (2**22 + b))) - bits(2**22), 0, R - 1)``: floats in
    ``[2**22, 2**23)`` are 1/2 apart, so for ``u(r) >= -1/4`` the bits count half units, ``i = rne(2 * fl(u))``, and
    a NaN or infinite ``r`` lands at an end. Then ``level = lo_i + [r >= t_i]`` and ``quantized`` is the matching
    column. Proof of exactness: ``i`` is non-decreasing in ``r`` (``a > 0``; rounding and the clamp are monotone).
    The kernel's ``fl(u)`` (one rounding if the multiply-add is fused, else the product's too, ``2**-24 * |a r|``,
    plus ``|a| * 2**-126 + 2**-126`` where a denormal ``r`` or product is flushed) is within ``eta`` of ``u(r)``, so
    every ``r`` with index ``i`` has ``u(r)`` in the band ``[i/2 - 1/4 - eta, i/2 + 1/4 + eta]`` (open below for
    ``i = 0``, above for ``i = R - 1``). A threshold whose ``u`` (computed in float64, exact for the float32
    product) lies below the band is ``< r`` for all those ``r``, one above it is ``> r``: so if at most one threshold
    lies in each band, ``level(r) = lo_i + [r >= t_i]`` for every float ``r``. The check below enforces it with
    ``eta = 2**-22 * (R + |b| + 2) + |a| * 2**-124``; the bands are 1/2 wide and the thresholds at least 1 apart, so
    it fails only for a degenerate stage (equal or underflowing thresholds, or more than :data:`GUESS_MAX_ROWS`
    rows: thresholds spread far more unevenly than ``atanh`` spreads them up to hundreds of levels).
    """
    q, d, m1 = thresholds.shape
    max_level = m1 + 1
    device = thresholds.device
    rows_min = max(1, 2 * max_level - 3)
    empty = torch.empty((0, d, 1 + rows_min, 4), dtype=torch.float32, device=device)
    thr = thresholds.detach().cpu().reshape(q * d, m1)
    n = q * d
    lv_rows = lv.cpu().repeat(q)                                           # (q*d,) L_j of each row
    k = torch.arange(m1)
    valid = k[None, :] < (lv_rows[:, None] - 1)
    t64 = thr.double()
    gaps = torch.where(valid[:, 1:], t64[:, 1:] - t64[:, :-1], float("inf")).amin(1) if m1 > 1 else torch.full((n,), float("inf"))
    first = t64[:, 0]
    scale = torch.where(torch.isfinite(gaps), gaps, first.abs().clamp_min(1e-30))  # one threshold: any a > 0
    a32 = (1.0 / scale).float()
    ad = a32.double()
    b = -torch.round(2 * ad * first) / 2                                   # a multiple of 1/2 near -a * thr[1]
    u = ad[:, None] * t64 + b[:, None]                                     # each threshold's u (exact line)
    u = torch.where(valid, u, float("nan"))
    top = torch.nan_to_num(u, nan=-float("inf")).amax(1)
    if not (torch.isfinite(a32).all() and (a32 > 0).all() and torch.isfinite(top).all() and torch.isfinite(gaps[lv_rows > 2]).all()):
        return empty
    rows = max(rows_min, int(torch.floor(2 * top.max()).item()) + 2)
    if rows > GUESS_MAX_ROWS or (b.abs() >= 2.0 ** 20).any():
        return empty
    eta = 2.0 ** -22 * (rows + b.abs() + 2) + ad * 2.0 ** -124            # (q*d,)
    i = torch.arange(rows, dtype=torch.float64)
    lower = torch.where(i > 0, i / 2 - 0.25, -float("inf"))[None, :] - eta[:, None]       # band of row i
    upper = torch.where(i < rows - 1, i / 2 + 0.25, float("inf"))[None, :] + eta[:, None]
    below = (u[:, None, :] < lower[:, :, None]) & valid[:, None, :]        # (q*d, R, L-1)
    inside = (u[:, None, :] <= upper[:, :, None]) & ~below & valid[:, None, :]
    if (inside.sum(2) > 1).any():
        return empty
    lo = below.sum(2)                                                      # (q*d, R)
    has = inside.any(2)
    which = torch.where(has, inside.int().argmax(2), 0)
    t_col = torch.where(has, thr.gather(1, which), float("nan"))
    qv = quantized.detach().cpu().reshape(n, max_level)
    last = (lv_rows - 1)[:, None]
    lo_col = qv.gather(1, lo.clamp(max=max_level - 1))
    hi_col = torch.where(has, qv.gather(1, torch.minimum(lo + 1, last)), lo_col)
    contribution = (lo.to(torch.int32) * basis.cpu().to(torch.int32).repeat(q)[:, None]).view(torch.float32)
    body = torch.stack([t_col, lo_col, hi_col, contribution], dim=2)       # (q*d, R, 4)
    head = torch.zeros(n, 1, 4)
    head[:, 0, 0] = a32
    head[:, 0, 1] = (GUESS_OFFSET + b).float()                            # exact: |b| < 2**20, a multiple of 1/2
    return torch.cat([head, body], dim=1).reshape(q, d, 1 + rows, 4).contiguous().to(device)


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
