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

Counting ``L - 1`` thresholds costs a compare and two selects each. The kernels instead guess the level with one
multiply-add and correct the guess with one threshold (:func:`guess_table`, which proves the result equal to the
count for every float, or turns the guess off for the configuration: the kernels then count).
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
    ``basis`` (d,) int32. ``guess`` (q, d, max(L), 4) float32: each stage's guess-and-correction table
    (:func:`guess_table`), or ``(0, d, max(L), 4)`` where the guess cannot be proven exact.
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


GUESS_MAGIC = 0x4B000000  # float32 bits of 2**23: fl(u + 2**23) holds round-half-even(u) in its low bits
GUESS_MARGIN = 2.0 ** -21  # relative bound on the kernel's error in u = r * a + b (fused or not, flushed or not)


def _guess_line(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row of ``t`` (rows, L-1) float64 thresholds (``valid`` marks a row's L_j - 1 entries, at least two), the
    slope ``a`` minimising ``max_k |a * t_k + b - k|`` over the valid ``k`` (with the best ``b``): that error is
    convex in ``a`` and its minimum lies between the smallest and largest ``1 / (t_{k+1} - t_k)``; ternary search."""
    k = torch.arange(t.shape[1], dtype=torch.float64)
    steps = torch.where(valid[:, 1:], 1.0 / (t[:, 1:] - t[:, :-1]), float("nan"))
    lo = torch.nan_to_num(steps, nan=float("inf")).amin(1)
    hi = torch.nan_to_num(steps, nan=float("-inf")).amax(1)

    def spread(a):
        e = a[:, None] * t - k
        return (torch.where(valid, e, -float("inf")).amax(1) - torch.where(valid, e, float("inf")).amin(1)) / 2

    for _ in range(100):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left = spread(m1) <= spread(m2)
        lo, hi = torch.where(left, lo, m1), torch.where(left, m2, hi)
    return (lo + hi) / 2


def guess_table(thresholds: torch.Tensor, quantized: torch.Tensor, lv: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The guess-and-correct table of every stage, ``(q, d, max(L), 4)`` float32 on the tables' device, or an empty
    ``(0, d, max(L), 4)`` tensor where the guess cannot be proven exact for some stage (the kernels then count
    thresholds: the compare chain).

    For stage ``s`` and channel ``j`` (``L = L_j``, ``M = max(L)``, ``thr[k]`` the ``k``-th threshold, 1-based, so that
    ``level(r) = #{k : r >= thr[k]}``):

    - row 0: ``(a, b, 0, 0)``, float32 with ``a > 0``: the line ``u(r) = a * r + b`` nearest (minimax) to
      ``u(thr[k]) = k - 1``;
    - row ``1 + g`` for ``g = 0 .. M - 2``: ``(thr[g + 1], quantized[g], quantized[g + 1], g * basis_j)`` for
      ``g <= L - 2``, and ``(NaN, quantized[L - 1], quantized[L - 1], (L - 1) * basis_j)`` past it (the last
      column is the int32's bits).

    The kernel computes ``g = clamp(rne(fl(r * a + b)), 0, M - 2)`` (``rne`` by adding ``2**23``; the clamp on the
    integer bits, which also sends NaN and infinities to an end) and takes, from row ``1 + g``,
    ``level = g + [r >= thr[g + 1]]`` and ``quantized = [r >= thr[g + 1]] ? quantized[g + 1] : quantized[g]`` (a NaN
    threshold never passes). This is the compare chain's result for every ``r`` iff ``g`` is ``level`` or
    ``level - 1`` (below ``L - 1``) and ``g >= L - 1`` only where ``level = L - 1``. Proof that the check below
    ensures it: ``g`` is a non-decreasing function of ``r`` (``a > 0``; rounding, ``+ 2**23`` and the clamp are
    monotone), and so is ``level``. Let ``level(r) = m``. If ``m >= 1``, ``r >= thr[m]``, so
    ``g(r) >= g(thr[m]) >= m - 1``. If ``m <= L - 2``, ``r <= prev(thr[m + 1])`` (the float below), so
    ``g(r) <= g(prev(thr[m + 1])) <= m``. Both hold if, for every ``k = 1 .. L - 1``,
    ``g(thr[k]) >= k - 1`` and ``g(prev(thr[k])) <= k - 1``, i.e. ``fl(u(thr[k])) > k - 1.5`` and
    ``fl(u(prev(thr[k]))) < k - 0.5``. The kernel's ``fl(u)`` is within ``2**-23 * (|a r| + |u|)`` of the exact
    ``a * r + b`` (one rounding if fused, two if not), plus ``|a| * 2**-126 + 2**-126`` where a flush-to-zero
    flushes a denormal ``r`` or product, so checking the exact values (float64: the float32 product is exact there)
    against the bounds with the margin ``2**-21 * (|a r| + |b| + 1) + |a| * 2**-125`` proves it (``r`` the point
    checked). The symmetric hard clamp (vqp >= 1.26's default) has evenly spaced
    thresholds (errors of about ``1e-6`` levels); the tanh bounds pass up to ``L = 10`` (their thresholds
    spread by ``atanh``), and any stage that fails turns the guess off for the whole configuration.
    """
    q, d, m1 = thresholds.shape
    max_level = m1 + 1
    device = thresholds.device
    thr = thresholds.detach().cpu().reshape(q * d, m1)
    lv_rows = lv.cpu().repeat(q)                                           # (q*d,) L_j of each row
    k = torch.arange(m1)
    valid = k[None, :] < (lv_rows[:, None] - 1)
    t64 = thr.double()
    a = torch.ones(q * d, dtype=torch.float64)                             # L = 2: any a > 0 (one threshold)
    many = lv_rows > 2
    if many.any():
        a[many] = _guess_line(t64[many], valid[many])
    a32 = a.float()
    e = a32.double()[:, None] * t64 - k
    b = -(torch.where(valid, e, -float("inf")).amax(1) + torch.where(valid, e, float("inf")).amin(1)) / 2
    b32 = b.float()
    prev = thr.nextafter(torch.tensor(-float("inf")))
    ad, bd = a32.double()[:, None], b32.double()[:, None]
    p64 = prev.double()
    u_at, u_prev = ad * t64 + bd - k, ad * p64 + bd - k

    def margin(r):
        return GUESS_MARGIN * ((ad * r).abs() + bd.abs() + 1) + ad.abs() * 2.0 ** -125

    ok = (u_at > -0.5 + margin(t64)) & (u_prev < 0.5 - margin(p64)) & (a32 > 0)[:, None] & torch.isfinite(a32)[:, None]
    ok &= torch.isfinite(b32)[:, None]
    if not bool(torch.where(valid, ok, True).all()):
        return torch.empty((0, d, max_level, 4), dtype=torch.float32, device=device)

    qv = quantized.detach().cpu().reshape(q * d, max_level)
    basis_rows = basis.cpu().to(torch.int32).repeat(q)
    g = torch.arange(max_level - 1)
    last = (lv_rows - 1)[:, None]
    inside = g[None, :] <= last - 1                                        # g <= L - 2
    thr_col = torch.where(inside, thr, float("nan"))
    lo_col = qv.gather(1, torch.minimum(g[None, :], last).expand(q * d, -1))
    hi_col = qv.gather(1, torch.minimum(g[None, :] + 1, last).expand(q * d, -1))
    contribution = (torch.minimum(g[None, :], last).to(torch.int32) * basis_rows[:, None]).view(torch.float32)
    rows = torch.stack([thr_col, lo_col, hi_col, contribution], dim=2)     # (q*d, M-1, 4)
    head = torch.zeros(q * d, 1, 4)
    head[:, 0, 0], head[:, 0, 1] = a32, b32
    return torch.cat([head, rows], dim=1).reshape(q, d, max_level, 4).contiguous().to(device)


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
