"""Fused FSQ: Triton kernels, their launchers and the ``torch.library`` custom ops.

Read top to bottom: the three kernels (forward, backward, decode; the forward's constexpr flags ``WRITE_INDICES``,
``TRACK_USAGE`` and ``NOISE`` serve ``return_indices=False``, ``track_usage=True`` and ``noise_dropout``, and compile
to the plain kernel when off), the launch heuristics, the custom
ops in the ``fsq_triton`` namespace (a Triton implementation for CUDA; for CPU, unless ``TRITON_INTERPRET=1``
asks for the kernels there, the kernels' table math in torch ops, ``torch_impl.quantize_by_tables``, which serves
every bound without reading the tables on the host; and shape-only fake implementations).
Their gradients (registered autograd, and the autograd.Functions the module calls) are in ``autograd.py``.

Every kernel works on the *feature view* of a tensor, ``(b, c*d, n)`` with arbitrary strides:
``b`` batch, ``c`` codebooks, ``d = len(levels)`` channels per codebook, ``n`` tokens. A
channel-first image or video ``(b, c*d, *spatial)`` flattens its spatial dims into ``n``; a
channel-last sequence ``(b, n, c*d)`` is transposed. Nothing is copied to reach that view. One
program owns ``BLOCK_N`` tokens of one batch row and all their channels, so a token's index is
reduced in registers. When the batch stride equals ``n * token stride`` (channel-last contiguous),
the batch is folded into the token axis so that short sequences still fill whole blocks.

Offsets are computed in int64 (``OFFSET_64``) whenever any address of a launch can pass 2**31.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .. import autotune
from .. import levels as _lv
from .._mode import interpreting
from .. import torch_impl


# Column layout of the level tables (see fsq_triton.levels.LevelTables), as kernel constants.
COL_SHIFT = tl.constexpr(_lv.COL_SHIFT)
COL_GRAD_SCALE = tl.constexpr(_lv.COL_GRAD_SCALE)
COL_CLAMP_LO = tl.constexpr(_lv.COL_CLAMP_LO)
COL_CLAMP_HI = tl.constexpr(_lv.COL_CLAMP_HI)
COL_SMOOTH = tl.constexpr(_lv.COL_SMOOTH)
COL_THRESHOLDS = tl.constexpr(_lv.COL_THRESHOLDS)
COL_BASIS = tl.constexpr(_lv.COL_BASIS)
COL_NUM_LEVELS = tl.constexpr(_lv.COL_NUM_LEVELS)
INT_COLS = tl.constexpr(3)
TWICE_LEVEL_BIAS = tl.constexpr(0x4A800000)  # the bits of 2**22 (see twice_level)
# Triton's interpreter truncates float32 -> bfloat16 instead of rounding to nearest even; round by hand there.
EMULATE_BF16_RNE = tl.constexpr(interpreting())


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def tile_origin(num_n_blocks, BLOCK_N: tl.constexpr, OFFSET_64: tl.constexpr):
    """(batch row, first token) of this program's tile: programs run over ``rows * num_n_blocks`` tiles."""
    pid = tl.program_id(0)
    b = pid // num_n_blocks
    n_start = (pid % num_n_blocks) * BLOCK_N
    if OFFSET_64:
        b = b.to(tl.int64)
        n_start = n_start.to(tl.int64)
    return b, n_start


@triton.jit
def table_entry(values, col, row_ok, other: tl.constexpr):
    """``values[col]`` of each element's table row; ``row_ok=None`` for one row shared by the whole tile (a scalar)."""
    if row_ok is None:
        return tl.load(values + col)
    else:
        return tl.load(values + col, mask=row_ok, other=other)


@triton.jit
def quantize_levels(z, values, row_ok, MAX_LEVEL: tl.constexpr):
    """``(level, code)`` per element: ``level = #{k : z >= thresholds[k]}``, ``code = codes[level]``.

    ``values`` points at each element's table row (broadcastable to ``z``, or one scalar row with ``row_ok=None``).
    Thresholds ascend, so the last one passed names the code: each step is one compare, one add and one
    select. A select, not a per-element gather from the table: triton 3.6 routes a gathered tile through
    shared memory (64 KB and barriers). Padding thresholds are NaN, which no comparison passes. Unrolled for
    the usual small levels, a loop past 64.
    """
    COL_CODES: tl.constexpr = COL_THRESHOLDS + MAX_LEVEL - 1
    level = tl.zeros(z.shape, dtype=tl.int32)
    code = tl.zeros(z.shape, dtype=tl.float32) + table_entry(values, COL_CODES, row_ok, 0.0)
    if MAX_LEVEL <= 64:
        for k in tl.static_range(MAX_LEVEL - 1):
            passed = z >= table_entry(values, COL_THRESHOLDS + k, row_ok, float("nan"))
            level += passed.to(tl.int32)
            code = tl.where(passed, table_entry(values, COL_CODES + 1 + k, row_ok, 0.0), code)
    else:
        for k in range(MAX_LEVEL - 1):
            passed = z >= table_entry(values, COL_THRESHOLDS + k, row_ok, float("nan"))
            level += passed.to(tl.int32)
            code = tl.where(passed, table_entry(values, COL_CODES + 1 + k, row_ok, 0.0), code)
    return level, code


@triton.jit
def quantize_row(z, values, MAX_LEVEL: tl.constexpr):
    """``(code, s)`` of a row of one channel, its table row ``values`` shared by the tile (scalars): each element's
    code as :func:`quantize_levels` finds it, selected threshold by threshold (one compare and one select each, no
    level counted), and the channel's ``s``, from which :func:`twice_level` reads each level back.

    ``s = 1 / |codes[1] - codes[0]|`` (a reciprocal square root of the step squared: one MUFU on a GPU, within 2 ulp).
    The codes are ``(k - hw) / hw`` (exactly ``s = hw``) or ``2 / (L - 1) * k - 1`` (``s = (L - 1) / 2``) rounded to
    float32, so the step is ``1 / s`` to within ``2**-24`` and ``s`` is within ``s**2 * 2**-23`` (below 0.03 for
    the largest level, 1000, that ``validate_levels`` takes) of that multiple of 1/2."""
    COL_CODES: tl.constexpr = COL_THRESHOLDS + MAX_LEVEL - 1
    code0 = tl.load(values + COL_CODES)
    code1 = tl.load(values + COL_CODES + 1)
    code = tl.where(z >= tl.load(values + COL_THRESHOLDS), code1, code0)
    if MAX_LEVEL <= 64:
        for k in tl.static_range(1, MAX_LEVEL - 1):
            code = tl.where(z >= tl.load(values + COL_THRESHOLDS + k), tl.load(values + COL_CODES + 1 + k), code)
    else:
        for k in range(1, MAX_LEVEL - 1):
            code = tl.where(z >= tl.load(values + COL_THRESHOLDS + k), tl.load(values + COL_CODES + 1 + k), code)
    step = code1 - code0
    return code, tl.math.rsqrt(step * step)


@triton.jit
def twice_level(code, s):
    """``bits(2**22) + 2 * level`` of a code of the table, ``s`` its channel's (:func:`quantize_row`):
    ``bits(fma(code, s, s + 2**22))``.

    float32 numbers in ``[2**22, 2**23)`` are 1/2 apart and ``s`` is within 1/4 of a multiple of 1/2, so ``s + 2**22``
    is that multiple plus ``2**22`` exactly; ``code * s`` is within 1/4 of ``level - s`` (each code is a few ulp from
    exact), so the sum rounds to ``2**22 + level``, fused or not (the interpreter multiplies, then adds), for every
    code of every valid level set and bound (``tests/test_level_from_code.py`` checks them all). Its bits are
    ``bits(2**22) + 2 * level``."""
    return tl.fma(code, s, s + 4194304.0).to(tl.int32, bitcast=True)


@triton.jit
def code_of_level(level, values, row_ok, MAX_LEVEL: tl.constexpr):
    """``codes[level]`` per element by a select over the levels (no gather, as in :func:`quantize_levels`)."""
    COL_CODES: tl.constexpr = COL_THRESHOLDS + MAX_LEVEL - 1
    code = tl.zeros(level.shape, dtype=tl.float32)
    if MAX_LEVEL <= 64:
        for k in tl.static_range(MAX_LEVEL):
            code = tl.where(level == k, table_entry(values, COL_CODES + k, row_ok, 0.0), code)
    else:
        for k in range(MAX_LEVEL):
            code = tl.where(level == k, table_entry(values, COL_CODES + k, row_ok, 0.0), code)
    return code


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even (by hand for bfloat16 under the interpreter, which truncates)."""
    if EMULATE_BF16_RNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def noise_draw(code, seed, p, element):
    """vqp's noise dropout before its clamp: ``(hit, code + U(-1/2, 1/2))``, ``hit`` with probability ``p``.

    Two Philox draws per element, from ``(seed, element)`` and ``(seed + 1, element)``, ``element`` its id in the
    token-major order ``(token * c*d + channel)`` (the same for either layout and whether the batch is folded or
    not): the forward (:func:`noise_dropout`) and the backward draw the same numbers. No noise tensor exists."""
    u_hit = tl.rand(seed, element)  # two draws, not one rand4x: using two of its four outputs made triton (3.6
    u_offset = tl.rand(seed + 1, element)  # and 3.9) exchange them through shared memory with dozens of barriers
    return u_hit < p, code + (u_offset - 0.5)


@triton.jit
def noise_dropout(code, seed, p, element):
    """vqp's noise dropout on codes: with probability ``p``, ``clamp(code + U(-1/2, 1/2), -1, 1)``; else ``code``."""
    hit, noisy = noise_draw(code, seed, p, element)
    return tl.where(hit, tl.minimum(tl.maximum(noisy, -1.0), 1.0), code)


@triton.jit
def codebook_tile(n_start, N, C: tl.constexpr, D: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, OFFSET_64: tl.constexpr):
    """The ids of a (tokens, codebooks, channels) tile: ``(token, codebook, channel within it, channel, channel
    in range, element in range)``, broadcastable to ``(BLOCK_N, C_PAD, D_PAD)``."""
    tt = n_start + tl.arange(0, BLOCK_N)[:, None, None]
    cc = tl.arange(0, C_PAD)[None, :, None]
    dd = tl.arange(0, D_PAD)[None, None, :]
    chan = cc * D + dd
    if OFFSET_64:
        chan = chan.to(tl.int64)
    d_ok = dd < D
    return tt, cc, dd, chan, d_ok, (tt < N) & (cc < C) & d_ok


@triton.jit
def rotate_codebooks(t, rot_ptr, dd, d_ok, D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``t @ R`` per token and codebook (``TRANSPOSED``: ``t @ R.T``), ``t (tokens, codebooks, D_PAD)`` float32 with
    the channels on the last axis (``dd``, ``d_ok``: its channel ids and their mask), ``R (D, D)`` float32 row-major:

        out[..., j] = (((t[..., 0] * R[0, j]) + t[..., 1] * R[1, j]) + ...) + t[..., D-1] * R[D-1, j]

    summed in that order, one term a step: torch's CPU matmul of a ``(m, d) @ (d, d)`` product with ``d <= 8`` rounds
    exactly so (mul, then add; measured on torch 2.11 and 2.13), which the interpreter reproduces; on a GPU the
    compiler contracts each step into one FMA. Channel ``k`` is taken out of the tile by a sum of one nonzero term
    (exact), so every thread works on the channels it holds. Padding channels come out 0."""
    acc = tl.zeros(t.shape, dtype=tl.float32)
    for k in tl.static_range(D):
        t_k = tl.sum(tl.where(dd == k, t, 0.0), axis=2)
        if TRANSPOSED:
            r = tl.load(rot_ptr + dd * D + k, mask=d_ok, other=0.0)  # R.T[k, j] = R[j, k]
        else:
            r = tl.load(rot_ptr + k * D + dd, mask=d_ok, other=0.0)  # R[k, j]
        acc = acc + t_k[:, :, None] * r
    return tl.where(d_ok, acc, 0.0)  # (an infinite t times a padding 0 would be NaN there)


@triton.jit
def _fsq_forward_kernel(
    z_ptr, out_ptr, idx_ptr, hist_ptr, val_ptr, int_ptr, rot_ptr,
    N, num_n_blocks, hist_stride, noise_seed, noise_p,
    stride_zb, stride_zc, stride_zn,
    stride_ob, stride_oc, stride_on,
    C: tl.constexpr, D: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr,
    MAX_LEVEL: tl.constexpr, BLOCK_N: tl.constexpr, CHANNEL_ROWS: tl.constexpr, OFFSET_64: tl.constexpr,
    WRITE_INDICES: tl.constexpr, TRACK_USAGE: tl.constexpr, COUNT_SPLIT: tl.constexpr, DENSE: tl.constexpr,
    NOISE: tl.constexpr, ROTATE: tl.constexpr, READ_BACK: tl.constexpr, ROWS_AHEAD: tl.constexpr,
):
    """FSQ forward, one pass over a tile of ``BLOCK_N`` tokens x all ``c*d`` channels (the default launch:
    ``WRITE_INDICES``, no ``TRACK_USAGE``, no ``NOISE``, no ``ROTATE``; ``hist_ptr``, ``rot_ptr`` and the noise
    arguments are then unused).

    Math, per element ``z`` of channel ``j`` (with ``L = L_j``, ``hw = L // 2``):
        level = #{k : z >= thr[j, k]}        (= round(tanh(z + shift) * half_l - offset) + hw; NaN padding never counts)
        out   = codes[j, level]              (= (level - hw) / hw, IEEE division, selected from the table)
        out   = NaN where z is NaN
    per token and codebook ``c``: index = sum_j level_j * basis_j, or -1 if any channel is NaN;
        ``WRITE_INDICES``: indices[token, c] = index      (otherwise neither reduced nor stored: no int32 limit)
        ``TRACK_USAGE``:   hist[c, index] += 1 (int64, relaxed atomic), for every in-range token whose
                           channels are all non-NaN (a NaN token counts nowhere)
    The thresholds were calibrated on this device with the reference's own ops, so no ``tanh`` is
    evaluated and the result is the reference's, bit for bit.

    ``CHANNEL_ROWS`` (channel-first): channel by channel, a row of ``BLOCK_N`` tokens with the channel's
    constants as scalars; a row's code is selected threshold by threshold and its level read back from the code
    (``READ_BACK``: :func:`quantize_row`, :func:`twice_level`, the same level without counting), a codebook's rows
    loaded ``ROWS_AHEAD`` at a time before any is stored (both chosen by :func:`row_plan`). Otherwise
    (channel-last): ``out`` from a (tokens, codebooks, channels) tile, and the index from the channel rows of the
    same tokens, re-read from L1 (no reduction across lanes; skipped when neither flag needs the index). ``DENSE``: ``z`` and ``out`` are channel-last contiguous, and their
    token stride is the constexpr ``C * D`` (:func:`dense_token_stride`).

    Memory traffic per element: read ``z`` once from DRAM (4 B float32, 2 B bfloat16/float16; channel-last
    reads it a second time from L1 when an index is needed), write ``out`` once (same size); the per-level
    tables (a few hundred bytes) stay in cache. Per flag:
        ``WRITE_INDICES``: + 4 B of int32 index written per ``d`` elements (4/d B per element; False: none, and
                           with ``TRACK_USAGE`` also False no index is reduced and channel-last skips the L1 re-read);
        ``TRACK_USAGE``:   + one 8 B int64 atomic add per ``d`` elements (8/d B per element, a read-modify-write
                           of one histogram entry, done in L2: the histogram, 8 B x codebook_size <= 8 MiB per
                           codebook, is touched by atomics only, never streamed or zeroed by this kernel; tokens
                           of one code contend for its entry, as ``index_add_``'s atomics would);
        ``NOISE``:         no memory traffic: each ``out`` element is :func:`noise_dropout` of its code (vqp's
                           noise dropout, probability ``noise_p``, Philox keyed by ``noise_seed``); the index
                           comes from the code before the noise, as in vqp.
        ``ROTATE``:        no memory traffic (``R``, ``d*d`` floats, stays in cache): vqp's orthogonal rotation,
                           per token and codebook ``y = z_c @ R`` (:func:`rotate_codebooks`) is what the thresholds
                           count and the index is made of, and ``out_c = codes_c @ R.T`` (after the noise, if any).
                           Either layout then works on the (tokens, codebooks, channels) tile, and the index is
                           summed over the channels each thread holds (no channel rows re-read).
    """
    b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1      # floats per row of the value table
    if DENSE:  # z and out channel-last contiguous: the token stride as a constexpr (see dense_token_stride)
        stride_zn = C * D
        stride_on = C * D

    if ROTATE:
        # Either layout: a (tokens, codebooks, channels) tile, rotated per codebook, quantized, rotated back.
        tt, cc, dd, chan, d_ok, mask = codebook_tile(n_start, N, C, D, C_PAD, D_PAD, BLOCK_N, OFFSET_64)
        zt = tl.load(z_ptr + (b * stride_zb + chan * stride_zc + tt * stride_zn), mask=mask, other=0.0).to(tl.float32)
        y = rotate_codebooks(zt, rot_ptr, dd, d_ok, D, False)
        level, code = quantize_levels(y, val_ptr + dd * ROW, d_ok, MAX_LEVEL)
        is_nan = y != y
        code = tl.where(is_nan, y, code)
        if NOISE:
            code = noise_dropout(code, noise_seed, noise_p, (b * N + tt) * (C * D) + chan)
        rotated = rotate_codebooks(code, rot_ptr, dd, d_ok, D, True)
        tl.store(out_ptr + (b * stride_ob + chan * stride_oc + tt * stride_on),
                 cast_rne(rotated, out_ptr.dtype.element_ty), mask=mask)
        if WRITE_INDICES or TRACK_USAGE:
            basis = tl.load(int_ptr + dd * INT_COLS + COL_BASIS, mask=d_ok, other=0)
            index = tl.sum(level * basis, axis=2)                       # (tokens, codebooks)
            token_nan = tl.max(is_nan.to(tl.int32), axis=2) != 0
            t2 = n_start + tl.arange(0, BLOCK_N)[:, None]
            c2 = tl.arange(0, C_PAD)[None, :]
            tok_ok = (t2 < N) & (c2 < C)
            if WRITE_INDICES:
                tl.store(idx_ptr + ((b * N + t2) * C + c2), tl.where(token_nan, -1, index), mask=tok_ok)
            if TRACK_USAGE:
                if OFFSET_64:
                    hist_stride = hist_stride.to(tl.int64)
                count_usage(hist_ptr + c2 * hist_stride, index, (tok_ok & (token_nan == 0)).to(tl.int8), 1)

    if not CHANNEL_ROWS and not ROTATE:
        # Channel-last: `out` from a (tokens, codebooks, channels) tile, channels fastest (128-bit accesses).
        tt = n_start + tl.arange(0, BLOCK_N)[:, None, None]  # token
        cc = tl.arange(0, C_PAD)[None, :, None]             # codebook
        dd = tl.arange(0, D_PAD)[None, None, :]             # channel within the codebook
        chan = cc * D + dd
        if OFFSET_64:
            chan = chan.to(tl.int64)
        d_ok = dd < D
        mask = (tt < N) & (cc < C) & d_ok
        zt = tl.load(z_ptr + (b * stride_zb + chan * stride_zc + tt * stride_zn), mask=mask, other=0.0).to(tl.float32)
        _, code = quantize_levels(zt, val_ptr + dd * ROW, d_ok, MAX_LEVEL)
        code = tl.where(zt != zt, zt, code)
        if NOISE:
            code = noise_dropout(code, noise_seed, noise_p, (b * N + tt) * (C * D) + chan)
        tl.store(out_ptr + (b * stride_ob + chan * stride_oc + tt * stride_on),
                 cast_rne(code, out_ptr.dtype.element_ty), mask=mask)

    # Row by row: channel j of BLOCK_N tokens, its table row a scalar (uniform across the program). Channel-first
    # rows are contiguous (128-bit accesses) and write `out`; channel-last rows re-read the tile above from L1 for
    # the index only (summing the tile's channels across the lanes that hold them would make the compiler
    # exchange the sums through shared memory).
    if (CHANNEL_ROWS or WRITE_INDICES or TRACK_USAGE) and not ROTATE:
        # READ_BACK, ROWS_AHEAD: see row_plan
        nn = n_start + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        if OFFSET_64:
            stride_zc = stride_zc.to(tl.int64)
            stride_oc = stride_oc.to(tl.int64)
            if TRACK_USAGE:
                hist_stride = hist_stride.to(tl.int64)
        for c in tl.static_range(C):
            twice = tl.zeros((BLOCK_N,), dtype=tl.int32)  # READ_BACK: sum_j bits(2**22 + level_j) * basis_j (mod 2**32)
            bias = tl.zeros((BLOCK_N,), dtype=tl.int32)   # sum_j basis_j (the same for every token: one register)
            index = tl.zeros((BLOCK_N,), dtype=tl.int32)  # otherwise: sum_j level_j * basis_j
            token_nan = tl.zeros((BLOCK_N,), dtype=tl.int1)
            # The rows are loaded ROWS_AHEAD at a time, before any of them is stored: `z` and `out` may alias as far
            # as the compiler knows, so a row loaded after a store waits for it (ROWS_AHEAD = 1: one row in flight).
            for g in tl.static_range(0, D, ROWS_AHEAD):
                rows = ()
                for i in tl.static_range(ROWS_AHEAD):
                    if g + i < D:
                        rows = rows + (tl.load(z_ptr + (b * stride_zb + (c * D + g + i) * stride_zc + nn * stride_zn),
                                               mask=n_ok, other=0.0),)
                for i in tl.static_range(ROWS_AHEAD):
                    if g + i < D:
                        j = g + i
                        z = rows[i].to(tl.float32)
                        if READ_BACK:
                            code, s = quantize_row(z, val_ptr + j * ROW, MAX_LEVEL)
                        else:
                            level, code = quantize_levels(z, val_ptr + j * ROW, None, MAX_LEVEL)
                        is_nan = z != z
                        if WRITE_INDICES or TRACK_USAGE:
                            basis = tl.load(int_ptr + j * INT_COLS + COL_BASIS)
                            if READ_BACK:
                                twice += twice_level(code, s) * basis
                                bias += basis
                            else:
                                index += level * basis
                            token_nan = token_nan | is_nan
                        if CHANNEL_ROWS:
                            code = tl.where(is_nan, z, code)
                            if NOISE:
                                code = noise_dropout(code, noise_seed, noise_p, (b * N + nn) * (C * D) + (c * D + j))
                            tl.store(out_ptr + (b * stride_ob + (c * D + j) * stride_oc + nn * stride_on),
                                     cast_rne(code, out_ptr.dtype.element_ty), mask=n_ok)
            if READ_BACK:
                # 2 * index = twice - bits(2**22) * sum_j basis_j, below 2**32 for any int32 index: halved unsigned
                index = ((twice - bias * TWICE_LEVEL_BIAS).to(tl.uint32, bitcast=True) >> 1).to(tl.int32, bitcast=True)
            if WRITE_INDICES:
                tl.store(idx_ptr + ((b * N + nn) * C + c), tl.where(token_nan, -1, index), mask=n_ok)
            if TRACK_USAGE:
                count_usage(hist_ptr + c * hist_stride, index, (n_ok & (token_nan == 0)).to(tl.int8), COUNT_SPLIT)


@triton.jit
def halves(x):
    """``(x[0::2], x[1::2])`` of a 1-d tile (even length), by reshape and split: where a thread holds ``2k``
    consecutive elements, each half keeps ``k`` of them in the same registers (no data moves)."""
    return tl.split(tl.reshape(x, (x.shape[0] // 2, 2)))


@triton.jit
def count_usage(row_ptr, index, counted, SPLIT: tl.constexpr):
    """``row_ptr[index] += 1`` (int64, relaxed atomics) where ``counted`` (int8, nonzero: count); the result is
    unused (triton 3.9 emits a reduction, ``red``; 3.6 an ``atom`` whose result is dropped).

    The address of an atomic has no known contiguity, so the compiler lays it out one element a thread. Rows
    that hold ``SPLIT`` consecutive tokens a thread (chosen by the launcher: the 128-bit channel-first rows, or
    a contiguous int32 index row) would be converted to that layout through shared memory (8 KB and 3 barriers
    for 1024 tokens); they are halved ``log2(SPLIT)`` times instead (registers only), one atomic per part.
    """
    if SPLIT == 1:
        tl.atomic_add(row_ptr + index, tl.full(index.shape, 1, tl.int64), mask=counted != 0, sem="relaxed")
    else:
        index_even, index_odd = halves(index)
        counted_even, counted_odd = halves(counted)
        count_usage(row_ptr, index_even, counted_even, SPLIT // 2)
        count_usage(row_ptr, index_odd, counted_odd, SPLIT // 2)


@triton.jit
def _fsq_backward_kernel(
    g_ptr, z_ptr, dz_ptr, val_ptr, rot_ptr,
    N, num_n_blocks, noise_seed, noise_p,
    stride_gb, stride_gc, stride_gn,
    stride_zb, stride_zc, stride_zn,
    stride_db, stride_dc, stride_dn,
    CD: tl.constexpr, D: tl.constexpr, CD_PAD: tl.constexpr, MAX_LEVEL: tl.constexpr,
    BLOCK_N: tl.constexpr, OFFSET_64: tl.constexpr, DENSE: tl.constexpr, NOISE: tl.constexpr,
    ROTATE: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """Straight-through FSQ backward, recomputed from the saved input ``z`` alone.

    Math, per element of channel ``j``: ``x = z + shift[j]``, ``s = grad_scale[j]`` (d code / d bounded value),
        tanh bounds (smooth[j] = 1):   dz = g * s * (1 - tanh(x)^2),  1 - tanh(x)^2 = 4u / (1 + u)^2,  u = exp(-2|x|)
        hard clamps (smooth[j] = 0):   dz = g * s  where clamp_lo[j] <= z < clamp_hi[j]  (-1 <= x <= 1), else 0
    (the rounding passes the gradient through; that form of sech^2 has no cancellation and no overflow,
    and is within a few ulp of the reference's ``1 - t*t``). Every bound is a row of constants, not a branch.

    Memory traffic per element: read ``g`` and ``z`` (4 B each in float32, 2 B in half precision),
    write ``dz`` (same size); nothing else was saved.

    ``DENSE``: all three are channel-last contiguous, and their token stride is the constexpr ``CD``.
    ``NOISE``: the forward's noise dropout (:func:`noise_dropout`, same ``noise_seed``, ``noise_p``) is redrawn,
    and ``dz = 0`` where its clamp cut the noisy code (``code + offset`` outside ``[-1, 1]``, as torch's clamp
    passes no gradient there); the code is recomputed from ``z`` with the forward's thresholds. No extra traffic.
    ``ROTATE`` (vqp's orthogonal rotation, ``R`` at ``rot_ptr``; ``C_PAD``, ``D_PAD`` pad the codebooks and channels):
    per token and codebook, with ``y = z_c @ R`` recomputed, ``dz_c = ((g_c @ R) * (d code / d y)) @ R.T``, the
    factor above evaluated at ``y`` (a (tokens, codebooks, channels) tile, :func:`rotate_codebooks`). No extra traffic.
    """
    b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
    if DENSE:  # see dense_token_stride
        stride_gn = CD
        stride_zn = CD
        stride_dn = CD
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1

    if ROTATE:
        tt, cc, dd, chan, d_ok, mask = codebook_tile(n_start, N, CD // D, D, C_PAD, D_PAD, BLOCK_N, OFFSET_64)
        g = tl.load(g_ptr + (b * stride_gb + chan * stride_gc + tt * stride_gn), mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + (b * stride_zb + chan * stride_zc + tt * stride_zn), mask=mask, other=0.0).to(tl.float32)
        y = rotate_codebooks(z, rot_ptr, dd, d_ok, D, False)
        g_y = rotate_codebooks(g, rot_ptr, dd, d_ok, D, False)
        dy = straight_through_factor(g_y, y, val_ptr + dd * ROW, d_ok)
        if NOISE:
            _, code = quantize_levels(y, val_ptr + dd * ROW, d_ok, MAX_LEVEL)
            hit, noisy = noise_draw(code, noise_seed, noise_p, (b * N + tt) * CD + chan)
            dy = tl.where(hit & ((noisy < -1.0) | (noisy > 1.0)), 0.0, dy)
        dz = rotate_codebooks(dy, rot_ptr, dd, d_ok, D, True)
        tl.store(dz_ptr + (b * stride_db + chan * stride_dc + tt * stride_dn), cast_rne(dz, dz_ptr.dtype.element_ty),
                 mask=mask)
    else:
        _straight_through_rows(g_ptr, z_ptr, dz_ptr, val_ptr, b, n_start, N, noise_seed, noise_p,
                               stride_gb, stride_gc, stride_gn, stride_zb, stride_zc, stride_zn,
                               stride_db, stride_dc, stride_dn, CD, D, CD_PAD, MAX_LEVEL, BLOCK_N, OFFSET_64, NOISE)


@triton.jit
def straight_through_factor(g, z, values, row_ok):
    """``g * d code / d z`` per element (the math of :func:`_fsq_backward_kernel`), ``values`` each element's table
    row (masked by ``row_ok``)."""
    shift = tl.load(values + COL_SHIFT, mask=row_ok, other=0.0)
    scale = tl.load(values + COL_GRAD_SCALE, mask=row_ok, other=0.0)
    clamp_lo = tl.load(values + COL_CLAMP_LO, mask=row_ok, other=0.0)
    clamp_hi = tl.load(values + COL_CLAMP_HI, mask=row_ok, other=0.0)
    smooth = tl.load(values + COL_SMOOTH, mask=row_ok, other=0.0) != 0.0
    u = tl.exp(-2.0 * tl.abs(z + shift))
    sech2 = 4.0 * u / ((1.0 + u) * (1.0 + u))
    inside = (z >= clamp_lo) & (z < clamp_hi)
    return tl.where(smooth, g * scale * sech2, tl.where(inside, g * scale, 0.0))


@triton.jit
def _straight_through_rows(
    g_ptr, z_ptr, dz_ptr, val_ptr, b, n_start, N, noise_seed, noise_p,
    stride_gb, stride_gc, stride_gn, stride_zb, stride_zc, stride_zn, stride_db, stride_dc, stride_dn,
    CD: tl.constexpr, D: tl.constexpr, CD_PAD: tl.constexpr, MAX_LEVEL: tl.constexpr, BLOCK_N: tl.constexpr,
    OFFSET_64: tl.constexpr, NOISE: tl.constexpr,
):
    """The backward without rotation: a (channels, tokens) tile, element by element."""
    chan = tl.arange(0, CD_PAD)[:, None]
    nn = n_start + tl.arange(0, BLOCK_N)[None, :]
    c_ok = chan < CD
    mask = c_ok & (nn < N)
    j = chan % D
    if OFFSET_64:
        chan = chan.to(tl.int64)

    g = tl.load(g_ptr + (b * stride_gb + chan * stride_gc + nn * stride_gn), mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + (b * stride_zb + chan * stride_zc + nn * stride_zn), mask=mask, other=0.0).to(tl.float32)
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1
    dz = straight_through_factor(g, z, val_ptr + j * ROW, c_ok)
    if NOISE:
        _, code = quantize_levels(z, val_ptr + j * ROW, c_ok, MAX_LEVEL)
        hit, noisy = noise_draw(code, noise_seed, noise_p, (b * N + nn) * CD + chan)
        dz = tl.where(hit & ((noisy < -1.0) | (noisy > 1.0)), 0.0, dz)
    tl.store(dz_ptr + (b * stride_db + chan * stride_dc + nn * stride_dn), cast_rne(dz, dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fsq_decode_kernel(
    idx_ptr, out_ptr, val_ptr, int_ptr, rot_ptr,
    N, num_n_blocks, codebook_size,
    stride_ob, stride_oc, stride_on,
    C: tl.constexpr, D: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr,
    MAX_LEVEL: tl.constexpr, BLOCK_N: tl.constexpr, CHANNEL_ROWS: tl.constexpr, GROUPS: tl.constexpr,
    OFFSET_64: tl.constexpr, DENSE: tl.constexpr, ROTATE: tl.constexpr,
):
    """``indices_to_codes``: token indices ``(b, n, c)`` to codes on the feature view ``(b, c*d, n)``.

    Math, per token index ``i`` and channel ``j``: ``level = (i // basis[j]) % L_j``,
    ``code = codes[j, level]`` (= ``(level - hw) / hw`` with IEEE division). An index outside
    ``[0, prod(levels))`` gives NaN codes: checking it on the host would cost a device sync.

    ``CHANNEL_ROWS`` (channel-first): one row of ``BLOCK_N`` tokens per channel, constants as scalars.
    Otherwise (channel-last): a (tokens, codebooks x ``GROUPS``, channels / ``GROUPS``) tile whose lanes each
    hold 16 bytes of one token's codes and read that token's index themselves.

    ``ROTATE`` (vqp's orthogonal rotation, ``R`` at ``rot_ptr``): each token's codes are ``codes_c @ R.T``
    (:func:`rotate_codebooks`, in float32, then cast), on the tile of either layout with ``GROUPS = 1`` (a lane holds
    whole tokens). No extra traffic (``R`` stays in cache).

    Memory traffic per element: write the code once (4 B float32, 2 B bfloat16/float16); read 4 B (int32)
    or 8 B (int64) of index per ``d`` elements (channel-last: per 16-byte group, the lanes of a token
    sharing one transaction).
    """
    b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1

    if CHANNEL_ROWS and not ROTATE:
        # Channel-first: one contiguous row of BLOCK_N tokens per channel, its constants scalars (uniform).
        nn = n_start + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        if OFFSET_64:
            stride_oc = stride_oc.to(tl.int64)
        for c in tl.static_range(C):
            index = tl.load(idx_ptr + ((b * N + nn) * C + c), mask=n_ok, other=0)
            valid = (index >= 0) & (index < codebook_size)
            index = tl.where(valid, index, 0)
            for j in tl.static_range(D):
                basis = tl.load(int_ptr + j * INT_COLS + COL_BASIS)
                nlev = tl.load(int_ptr + j * INT_COLS + COL_NUM_LEVELS)
                code = code_of_level((index // basis) % nlev, val_ptr + j * ROW, None, MAX_LEVEL)
                code = tl.where(valid, code, float("nan"))
                tl.store(out_ptr + (b * stride_ob + (c * D + j) * stride_oc + nn * stride_on),
                         cast_rne(code, out_ptr.dtype.element_ty), mask=n_ok)
    else:
        # Channel-last: a (tokens, codebooks x groups, W) tile, each token's channels split into GROUPS groups of
        # W = 16 bytes, so that one lane holds one group (a 128-bit store) and reads its token's index itself:
        # the lanes of a token read one address (one transaction), and the index load and the code store share a
        # layout (with the channels split across lanes inside one group, the compiler would exchange the index
        # or the codes through shared memory). `opaque_one` (= 1) hides the tokens' contiguity from the compiler,
        # which would otherwise lay the index load out for 128-bit loads of 4 tokens and convert that layout.
        W: tl.constexpr = D_PAD // GROUPS
        if DENSE:  # see dense_token_stride
            stride_on = C * D
        nn = n_start + tl.arange(0, BLOCK_N)[:, None, None]
        gg = tl.arange(0, C_PAD * GROUPS)[None, :, None]
        cc = gg // GROUPS
        dd = (gg % GROUPS) * W + tl.arange(0, W)[None, None, :]
        d_ok = dd < D
        tok_ok = (nn < N) & (cc < C)
        opaque_one = tl.where(codebook_size > 0, 1, 0)  # always 1 (a codebook is never empty); not folded (a Python
        # bool where torch.compile's mutation analysis passes codebook_size as a constant: `.to` would fail there)
        index = tl.load(idx_ptr + ((b * N + nn) * C * opaque_one + cc + dd * 0), mask=tok_ok & d_ok, other=0)
        valid = (index >= 0) & (index < codebook_size)
        index = tl.where(valid, index, 0)
        basis = tl.load(int_ptr + dd * INT_COLS + COL_BASIS, mask=d_ok, other=1)
        nlev = tl.load(int_ptr + dd * INT_COLS + COL_NUM_LEVELS, mask=d_ok, other=1)
        code = code_of_level((index // basis) % nlev, val_ptr + dd * ROW, d_ok, MAX_LEVEL)
        code = tl.where(valid, code, float("nan"))
        if ROTATE:  # GROUPS == 1: cc is the codebook, dd the channel
            code = rotate_codebooks(code, rot_ptr, dd, d_ok, D, True)
        chan = cc * D + dd
        if OFFSET_64:
            chan = chan.to(tl.int64)
        tl.store(out_ptr + (b * stride_ob + chan * stride_oc + nn * stride_on),
                 cast_rne(code, out_ptr.dtype.element_ty), mask=tok_ok & d_ok)


# --------------------------------------------------------------------------------------------------
# Launch geometry
# --------------------------------------------------------------------------------------------------

_INT32_LIMIT = 2**31


# Plain Python (triton.cdiv and triton.next_power_of_2 are jit functions: microseconds a call from the host).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())



def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any address of a launch can pass 2**31 elements: bounded by each tensor's storage (one call each)."""
    return any(t.untyped_storage().nbytes() >= _INT32_LIMIT * t.element_size() for t in tensors)


def _token_axes(*features: torch.Tensor) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(batch rows, tokens per row, per-tensor (batch, channel, token) strides) for one launch.

    When every tensor's batch stride is its token stride times ``n`` (channel-last contiguous), the
    batch folds into the token axis: one row of ``b * n`` tokens, so short sequences fill blocks.
    """
    b, _, n = features[0].shape
    strides = [tuple(t.stride()) for t in features]
    if b > 1 and all(sb == n * sn for sb, _, sn in strides):
        return 1, b * n, [(0, sc, sn) for _, sc, sn in strides]
    return b, n, strides


def count_split(element_size: int, channels_last: bool, write_indices: bool, num_codebooks: int, block_n: int,
                num_warps: int) -> int:
    """``COUNT_SPLIT`` of a forward launch that counts usage: the consecutive tokens a thread holds in the rows
    (see count_usage), as many as fill 16 bytes of a channel-first row, or 4 where a contiguous int32 index row
    is written (one codebook), at most the tokens per thread; else 1 (sm_90, triton 3.9 and 3.6: no shared
    memory for the counts then)."""
    vector = 16 // element_size if not channels_last else 4 if write_indices and num_codebooks == 1 else 1
    return max(1, min(vector, 8, block_n // (32 * num_warps)))


def capped_block_n(block_n: int, num_warps: int, channel_tile: int) -> int:
    """``BLOCK_N`` for a launch with in-kernel noise dropout or rotation: at most 8 elements a thread (noise: two
    Philox draws an element, sm_90 on triton 3.6 and 3.9: 32 elements a thread took 254-255 registers, one block an
    SM; rotation: the tile lives on as the rotated values, the codes and the rotated-back codes)."""
    cap = max(16, 1 << max(0, (8 * 32 * num_warps // channel_tile).bit_length() - 1))
    return min(block_n, cap)


def rotation_config(cfg: dict, channel_tile: int, element_size: int, channels_last: bool) -> dict:
    """The launch configuration of a forward or backward with the orthogonal rotation (``ROTATE``), from ``cfg``.
    Channel-first, where 16 bytes of every channel row a thread make at most 32 values: at most 4 warps, and as many
    tokens as that, so that the warps tile the tokens only and each thread holds whole tokens. Otherwise
    :func:`capped_block_n`. sm_90 (``bench/inspect_kernels.py``, 8 channels): float32 channel-first forward at 512
    tokens / 4 warps, 168 registers (192 on triton 3.9) and no shared memory, where at the capped 128 tokens the
    compiler spread the warps over the channels and the rotation's sums crossed warps through 2 KB of shared memory
    with 55 barriers; bfloat16 channel-first would need 64 values a thread (255 registers, 312 B spilled on 3.9), so
    it keeps the capped tile and those barriers."""
    tokens_per_thread = 16 // element_size
    if channels_last or tokens_per_thread * channel_tile > 32:
        return dict(cfg, BLOCK_N=capped_block_n(cfg["BLOCK_N"], cfg["num_warps"], channel_tile))
    num_warps = min(cfg["num_warps"], 4)
    return dict(cfg, BLOCK_N=32 * num_warps * tokens_per_thread, num_warps=num_warps)


def dense_token_stride(channels: int, *strides: tuple[int, int, int]) -> bool:
    """Whether every (batch, channel, token) stride triple is channel-last contiguous (channel stride 1, token stride
    ``channels``). The kernels then take the token stride as a constexpr: Triton marks a runtime stride divisible by
    16 only when it is, so with 4 or 8 channels it could not see that a token's channels are adjacent and aligned,
    and compiled scalar accesses (sm_90, both triton versions: ``bench/inspect_kernels.py``'s token-stride-8 rows)."""
    return all(sc == 1 and sn == channels for _, sc, sn in strides)


def row_plan(channels: int, channels_last: bool, element_size: int, block_n: int, num_warps: int) -> dict:
    """``READ_BACK`` and ``ROWS_AHEAD`` of a forward launch (its channel rows, ``channels`` per codebook).

    With at most 8 tokens a thread: every row of a codebook loaded before the first is stored (``ROWS_AHEAD``), and
    each level read back from the selected code (:func:`quantize_row`, :func:`twice_level`), but for 2-byte
    channel-last index rows, where counting the thresholds passed (:func:`quantize_levels`) compiled to fewer
    instructions. With more (16 tokens a thread: 2048 tokens x 4 warps), the rows as before issue 9, one at a time
    and counted: both changes took 255 registers there (80 bytes spilled in float32 on triton 3.6, 8 in bfloat16 on
    3.9), against 243 / 179 and 204 / 124 before. sm_90, 8 channels: ``bench/NOTES.md``."""
    tokens = max(1, block_n // (32 * num_warps))
    if tokens > 8:
        return {"READ_BACK": False, "ROWS_AHEAD": 1}
    return {"READ_BACK": not channels_last or element_size == 4, "ROWS_AHEAD": channels}


def _skip_launch(*grid_args, **kwargs):
    return None


class _NoLaunch:
    def __getitem__(self, grid):
        return _skip_launch


def _launch(kernel, probe: torch.Tensor):
    """The kernel to launch on ``probe``'s data: itself in plain eager calls, ``torch.library.wrap_triton(kernel)``
    while something traces (torch.compile, export, make_fx, fake or functional tensors, any dispatch mode), so
    that the tracer sees the kernel.

    Eager calls skip ``wrap_triton`` because it dispatches every launch through a higher-order op (measured on
    an H200 with torch 2.11, 2026-11-28: about 0.3 ms of host time per call; the custom ops' own bodies skip it
    the same way). Under the interpreter the kernel itself is called, on real CPU tensors only: torch before
    2.13 refuses to wrap the interpreter's kernels (they are not ``JITFunction``s), and shape propagation with
    fake tensors (the custom op's fake implementation) must not run them.
    """
    if interpreting():
        return _NoLaunch() if _is_fake(probe) else kernel
    if _plain_eager(probe):
        return kernel
    return torch.library.wrap_triton(kernel)


# A fake tensor is a subclass (so is any other tensor subclass: its own __torch_dispatch__ must see the op);
# torch.func's wrappers are plain ``torch.Tensor``s, told apart by ``is_functorch_wrapped_tensor``.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(probe: torch.Tensor) -> bool:
    """Whether a launch on ``probe`` is a plain eager call: a real tensor, no dispatch mode, nothing compiling."""
    return (
        type(probe) in PLAIN_TENSORS
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch.compiler.is_compiling()
    )


def _index_tensor(indices: torch.Tensor) -> torch.Tensor:
    """Indices as the decode kernels read them: (b * n, c) contiguous, int32 or int64 (other integer dtypes are
    widened or, for unsigned 32/64-bit values past the signed range, wrapped negative and so decode as invalid)."""
    if indices.dtype not in (torch.int32, torch.int64):
        wide = indices.dtype in (torch.uint32, torch.uint64)
        indices = indices.to(torch.int64 if wide else torch.int32)
    return indices.contiguous()


def _is_fake(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or is_fake(t)


# --------------------------------------------------------------------------------------------------
# Launchers (plain functions on the feature view; the custom ops below call them)
# --------------------------------------------------------------------------------------------------


def _empty_feature(shape, device, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    """A new (b, c*d, n) tensor whose memory is (b, n, c*d) or (b, c*d, n) contiguous."""
    b, cd, n = shape
    if channels_last:
        return torch.empty((b, n, cd), dtype=dtype, device=device).transpose(1, 2)
    return torch.empty((b, cd, n), dtype=dtype, device=device)


def device_guard(t: torch.Tensor):
    """A context that makes ``t``'s GPU the current CUDA device, where it is not already.

    Triton launches on the current device, and the eager path skips the dispatcher's device guard: without
    this, an input on ``cuda:1`` while ``cuda:0`` is current would be processed on the wrong GPU. (A no-op for
    CPU, meta and fake tensors, and while torch.compile traces: Inductor guards its own launches.)
    """
    if t.device.type != "cuda" or t.device.index is None or _is_fake(t) or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device.index)


def _configured_launch(kernel_name: str, probe: torch.Tensor, tokens: int, channel_tile: int, dtype, channels_last, launch):
    """Pick the launch configuration (fsq_triton.autotune: forced, tuned, cached or default) and launch on ``probe``'s GPU."""
    tokens = int(tokens)  # a SymInt while torch.compile traces: the configuration is per size class anyway
    key = autotune.problem_key(kernel_name, tokens, channel_tile, dtype, channels_last)
    default = autotune.default_config(channel_tile, tokens, interpreting(), kernel=kernel_name,
                                      element_size=dtype.itemsize, channels_last=channels_last)
    pipelined = kernel_name.startswith("projected")
    space = functools.partial(autotune.config_space, channel_tile, pipelined)
    with device_guard(probe):
        launch(autotune.launch_config(kernel_name, key, default, launch, probe, space))


def check_rotation(rotation: torch.Tensor, d: int, device: torch.device) -> None:
    """The kernels read ``R`` as ``d * d`` float32 values, row-major, on the launch's device: anything else is refused
    (a ValueError that says what was passed) rather than read wrong."""
    if (rotation.shape != (d, d) or rotation.dtype != torch.float32 or not rotation.is_contiguous()
            or rotation.device != device):
        raise ValueError(
            f"rotation must be a contiguous float32 ({d}, {d}) tensor on {device}, found {rotation.dtype} "
            f"{tuple(rotation.shape)} on {rotation.device}{'' if rotation.is_contiguous() else ' (not contiguous)'}")


def forward_triton(z, values, integers, num_codebooks: int, channels_last: bool, write_indices: bool = True,
                   usage: torch.Tensor | None = None, noise: tuple[int, float] | None = None,
                   rotation: torch.Tensor | None = None):
    """Launch the forward kernel: z (b, c*d, n) -> out (b, c*d, n) in z's dtype, indices (b, n, c) int32.

    ``write_indices=False``: the kernel neither reduces nor stores the indices, and ``indices`` is an empty
    ``(0,)`` int32 tensor (so any codebook size works). ``usage``: a ``(c, codebook_size)`` int64 contiguous
    histogram on z's device, to which the kernel adds each counted token's code (in place, no host sync).
    ``noise``: ``(seed, p)``, vqp's noise dropout on ``out`` drawn in the kernel (:func:`noise_dropout`).
    ``rotation``: vqp's orthogonal rotation ``R (d, d)``, float32 contiguous on z's device: the kernel quantizes
    ``z_c @ R`` and writes ``codes_c @ R.T`` (``ROTATE``).
    """
    b, cd, n = z.shape
    d, max_level = integers.shape[0], _lv.max_level_of(values)
    if rotation is not None:
        check_rotation(rotation, d, z.device)
    out = _empty_feature(z.shape, z.device, channels_last, z.dtype)
    if write_indices:
        indices = torch.empty((b, n, num_codebooks), dtype=torch.int32, device=z.device)
    else:
        indices = torch.empty((0,), dtype=torch.int32, device=z.device)  # a pointer the kernel never touches
    if out.numel() == 0:
        return out, indices
    rows, tokens, (sz, so) = _token_axes(z, out)
    c_pad, d_pad = next_pow2(num_codebooks), next_pow2(d)
    offset_64 = _needs_int64(z, out, indices, *(() if usage is None else (usage,)))
    dense = dense_token_stride(cd, sz, so)
    noise_seed, noise_p = noise if noise is not None else (0, 0.0)

    def launch(cfg):
        if rotation is not None:
            cfg = rotation_config(cfg, c_pad * d_pad, z.element_size(), channels_last)
        elif noise is not None:
            cfg = dict(cfg, BLOCK_N=capped_block_n(cfg["BLOCK_N"], cfg["num_warps"], c_pad * d_pad))
        nblocks = cdiv(tokens, cfg["BLOCK_N"])
        common = dict(
            C=num_codebooks, D=d, C_PAD=c_pad, D_PAD=d_pad, MAX_LEVEL=max_level,
            BLOCK_N=cfg["BLOCK_N"], CHANNEL_ROWS=not channels_last, OFFSET_64=offset_64, DENSE=dense,
            num_warps=cfg["num_warps"],
        )
        hist = indices if usage is None else usage  # (unused without TRACK_USAGE)
        split = 1 if usage is None or rotation is not None else count_split(
            z.element_size(), channels_last, write_indices, num_codebooks, cfg["BLOCK_N"], cfg["num_warps"])
        _launch(_fsq_forward_kernel, z)[(rows * nblocks,)](
            z, out, indices, hist, values, integers, values if rotation is None else rotation,
            tokens, nblocks, hist.shape[-1] if usage is not None else 0,
            noise_seed, noise_p, *sz, *so, **common,
            WRITE_INDICES=write_indices, TRACK_USAGE=usage is not None, COUNT_SPLIT=split, NOISE=noise is not None,
            ROTATE=rotation is not None,
            **row_plan(d, channels_last, z.element_size(), cfg["BLOCK_N"], cfg["num_warps"]),
        )

    _configured_launch("forward", z, rows * tokens, c_pad * d_pad, z.dtype, channels_last, launch)
    return out, indices


def backward_triton(grad_out, z, values, channels_last: bool, noise: tuple[int, float] | None = None,
                    rotation: torch.Tensor | None = None):
    """Launch the backward kernel: grad_out, z (b, c*d, n) -> grad_z (b, c*d, n) in z's dtype; ``noise``: the
    forward's ``(seed, p)``, whose clamp the gradient follows; ``rotation``: the forward's ``R``."""
    b, cd, n = z.shape
    d, max_level = values.shape[0], _lv.max_level_of(values)
    if rotation is not None:
        check_rotation(rotation, d, z.device)
    grad_z = _empty_feature(z.shape, z.device, channels_last, z.dtype)
    if grad_z.numel() == 0:
        return grad_z
    rows, tokens, (sg, sz, sd) = _token_axes(grad_out, z, grad_z)
    cd_pad = next_pow2(cd)
    dense = dense_token_stride(cd, sg, sz, sd)
    offset_64 = _needs_int64(grad_out, z, grad_z)
    noise_seed, noise_p = noise if noise is not None else (0, 0.0)

    c_pad, d_pad = (next_pow2(cd // d), next_pow2(d)) if rotation is not None else (1, 1)

    def launch(cfg):
        if rotation is not None:
            cfg = rotation_config(cfg, c_pad * d_pad, z.element_size(), channels_last)
        nblocks = cdiv(tokens, cfg["BLOCK_N"])
        _launch(_fsq_backward_kernel, z)[(rows * nblocks,)](
            grad_out, z, grad_z, values, values if rotation is None else rotation,
            tokens, nblocks, noise_seed, noise_p, *sg, *sz, *sd,
            CD=cd, D=d, CD_PAD=cd_pad, MAX_LEVEL=max_level,
            BLOCK_N=cfg["BLOCK_N"], OFFSET_64=offset_64, DENSE=dense, NOISE=noise is not None,
            ROTATE=rotation is not None, C_PAD=c_pad, D_PAD=d_pad, num_warps=cfg["num_warps"],
        )

    _configured_launch("backward", z, rows * tokens, cd_pad, z.dtype, channels_last, launch)
    return grad_z


def decode_triton(indices, values, integers, codebook_size: int, channels_last: bool, dtype: torch.dtype,
                  rotation: torch.Tensor | None = None):
    """Launch the decode kernel: indices (b, n, c) -> codes (b, c*d, n) in ``dtype``; ``rotation``: vqp's ``R``
    (float32, contiguous, on the indices' device), the codes then being ``codes_c @ R.T``."""
    b, n, c = indices.shape
    d, max_level = integers.shape[0], _lv.max_level_of(values)
    if rotation is not None:
        check_rotation(rotation, d, indices.device)
    out = _empty_feature((b, c * d, n), indices.device, channels_last, dtype)
    if out.numel() == 0:
        return out
    indices = _index_tensor(indices)  # read flat as (b * n, c); small next to the codes
    rows, tokens, (so,) = _token_axes(out)
    c_pad, d_pad = next_pow2(c), next_pow2(d)
    offset_64 = _needs_int64(indices, out)
    dense = dense_token_stride(c * d, so)

    rotate = rotation is not None

    def launch(cfg):
        if rotate:
            cfg = dict(cfg, BLOCK_N=capped_block_n(cfg["BLOCK_N"], cfg["num_warps"], c_pad * d_pad))
        nblocks = cdiv(tokens, cfg["BLOCK_N"])
        _launch(_fsq_decode_kernel, out)[(rows * nblocks,)](
            indices, out, values, integers, values if rotation is None else rotation,
            tokens, nblocks, codebook_size, *so,
            C=c, D=d, C_PAD=c_pad, D_PAD=d_pad, MAX_LEVEL=max_level, BLOCK_N=cfg["BLOCK_N"],
            CHANNEL_ROWS=not channels_last, GROUPS=1 if rotate else max(1, d_pad * out.element_size() // 16),
            OFFSET_64=offset_64, DENSE=dense, ROTATE=rotate, num_warps=cfg["num_warps"],
        )

    _configured_launch("decode", out, rows * tokens, c_pad * d_pad, dtype, channels_last, launch)
    return out


# --------------------------------------------------------------------------------------------------
# Custom ops: fsq_triton::quantize (and quantize_counted), fsq_triton::quantize_backward, fsq_triton::indices_to_codes
# --------------------------------------------------------------------------------------------------
# Each op runs its Triton launcher on CUDA tensors, and on real CPU tensors when TRITON_INTERPRET=1;
# otherwise the kernels' table math in torch ops (the same for every bound, so it traces). The op body is a ``triton_op``: Inductor and export trace into it
# (seeing the kernel through ``wrap_triton``), and it doubles as the fake implementation (allocation
# and a traced kernel call; the device branch is static while tracing).


def _runs_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (interpreting() and t.device.type == "cpu" and not _is_fake(t))


@torch.library.triton_op("fsq_triton::quantize", mutates_args=())
def quantize(
    z: torch.Tensor, values: torch.Tensor, integers: torch.Tensor, num_codebooks: int, channels_last: bool,
    write_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FSQ forward on the feature view ``z (b, c*d, n)`` -> ``(out (b, c*d, n) in z's dtype, indices (b, n, c) int32)``;
    ``write_indices=False``: ``indices`` is an empty ``(0,)`` int32 tensor (none reduced, none stored)."""
    if _runs_triton(z):
        return forward_triton(z, values, integers, num_codebooks, channels_last, write_indices)
    out, indices = torch_impl.quantize_by_tables(z, values, integers, num_codebooks)
    return _in_layout(out, channels_last), _indices_or_empty(indices, write_indices)


@torch.library.triton_op("fsq_triton::quantize_counted", mutates_args=("usage",))
def quantize_counted(
    z: torch.Tensor, values: torch.Tensor, integers: torch.Tensor, num_codebooks: int, channels_last: bool,
    write_indices: bool, usage: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` that also adds each token's code to ``usage (c, codebook_size)`` int64, in place, in the
    same kernel (a NaN token counts nowhere). A mutating op has no registered autograd: the module reaches it
    through ``FSQFunction``, whose backward is the same straight-through gradient."""
    if _runs_triton(z):
        return forward_triton(z, values, integers, num_codebooks, channels_last, write_indices, usage)
    out, indices = torch_impl.quantize_by_tables(z, values, integers, num_codebooks)
    flat = indices.reshape(-1, num_codebooks)
    slot = flat.clamp(min=0).to(torch.int64) + torch.arange(num_codebooks, device=flat.device) * usage.shape[-1]
    usage.view(-1).index_add_(0, slot.reshape(-1), (flat >= 0).reshape(-1).to(usage.dtype))
    return _in_layout(out, channels_last), _indices_or_empty(indices, write_indices)


def _indices_or_empty(indices: torch.Tensor, write_indices: bool) -> torch.Tensor:
    """The op's ``indices`` result (a new tensor), or the empty ``(0,)`` int32 tensor without indices."""
    return indices if write_indices else indices.new_empty((0,))


@torch.library.triton_op("fsq_triton::quantize_backward", mutates_args=())
def quantize_backward(grad_out: torch.Tensor, z: torch.Tensor, values: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Straight-through gradient of :func:`quantize` with respect to ``z``, recomputed from ``z``."""
    if _runs_triton(z):
        return backward_triton(grad_out, z, values, channels_last)
    grad_z = torch_impl.quantize_backward(
        grad_out, z, values[:, _lv.COL_SHIFT], values[:, _lv.COL_GRAD_SCALE],
        values[:, _lv.COL_CLAMP_LO], values[:, _lv.COL_CLAMP_HI], values[:, _lv.COL_SMOOTH],
    )
    return _in_layout(grad_z, channels_last)


@torch.library.triton_op("fsq_triton::indices_to_codes", mutates_args=())
def indices_to_codes(
    indices: torch.Tensor, values: torch.Tensor, integers: torch.Tensor, codebook_size: int,
    channels_last: bool, dtype: torch.dtype,
) -> torch.Tensor:
    """Codes of ``indices (b, n, c)`` on the feature view ``(b, c*d, n)``; NaN codes for indices out of range."""
    if _runs_triton(indices):
        return decode_triton(indices, values, integers, codebook_size, channels_last, dtype)
    codes = torch_impl.indices_to_codes_by_tables(indices, values, integers, codebook_size, dtype)
    return _in_layout(codes, channels_last)


def _in_layout(feature: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Copy of a (b, c*d, n) result in the memory layout the Triton path allocates (a custom op must not alias)."""
    out = _empty_feature(feature.shape, feature.device, channels_last, feature.dtype)
    return out.copy_(feature)


# (The ops' registered autograd, and the autograd.Functions the module calls, are in ``autograd.py``.)
