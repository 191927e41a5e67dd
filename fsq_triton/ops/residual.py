"""Fused residual FSQ: one Triton kernel runs every stage of every group; its backward; the custom ops.

Shape letters: ``b`` batch, ``g`` groups (``GroupedResidualFSQ``; 1 for ``ResidualFSQ``), ``d`` channels per group
(``len(levels)``), ``n`` tokens, ``q`` stages. The kernels work on the *feature view* ``x: (b, g*d, n)`` with any
strides (channel-first ``(b, g*d, *spatial)`` flattened, or channel-last ``(b, n, g*d)`` transposed: no copy), and
write the quantized sum in the same view and the indices as ``(g, b, n, q)`` int32.

The stage math and its calibration are in :mod:`fsq_triton.residual_levels`. Offsets are int64 (``OFFSET_64``)
whenever an address of the launch can pass 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import residual_levels as _rl
from .fsq import _is_fake, _launch, _needs_int64, cast_rne, device_guard, interpreting, tile_origin
from .fsq import cdiv as _cdiv
from .fsq import next_pow2 as _pow2

COL_SCALE = tl.constexpr(_rl.COL_SCALE)
COL_CLAMP_LO = tl.constexpr(_rl.COL_CLAMP_LO)
COL_CLAMP_HI = tl.constexpr(_rl.COL_CLAMP_HI)
COL_THRESHOLDS = tl.constexpr(_rl.COL_THRESHOLDS)
COL_SHIFT = tl.constexpr(_rl.COL_SHIFT)
COL_GRAD_K = tl.constexpr(_rl.COL_GRAD_K)
COL_SOFT_CLAMP = tl.constexpr(_rl.COL_SOFT_CLAMP)
COL_SOFT_CLAMP_INV = tl.constexpr(_rl.COL_SOFT_CLAMP_INV)
CHAN_COLS = tl.constexpr(_rl.CHANNEL_COLS)
INTERPRET = tl.constexpr(interpreting())
KIND_TANH_SHIFT = tl.constexpr(0)
KIND_SYM_TANH = tl.constexpr(1)
KIND_SYM_CLAMP = tl.constexpr(2)
SOFT_NONE = 0
SOFT_DIVIDE = 1     # x / c: a tensor c (per channel or 0-dim), or a Python float on the CPU
SOFT_RECIPROCAL = 2  # x * (1 / c): a Python float on CUDA (torch's division by a CPU scalar multiplies by its reciprocal)


def _torch_tanh_on_interpreter_tile(x):
    """Under Triton's interpreter only: ``tanh`` of a tile by ``torch.tanh`` on the CPU (the function the reference
    evaluates there). Triton's interpreter has no ``tanh`` (libdevice returns nothing); on CUDA the kernel calls
    libdevice's ``tanhf``, the function torch's CUDA ``tanh`` calls."""
    import numpy as np  # the interpreter's own dependency; fsq_triton needs no numpy elsewhere
    from triton.runtime.interpreter import TensorHandle

    data = torch.from_numpy(np.ascontiguousarray(x.handle.data)).tanh().numpy()
    return tl.tensor(TensorHandle(data, x.handle.dtype), x.type)


# A constexpr, so that the compiler's dependency scan accepts the reference (it is only called under the interpreter).
INTERPRETER_TANH = tl.constexpr(_torch_tanh_on_interpreter_tile)


@triton.jit
def tanh_f32(x):
    """``tanh`` as torch computes it on the device: libdevice ``tanhf`` on CUDA, ``torch.tanh`` under the interpreter."""
    if INTERPRET:
        return INTERPRETER_TANH(x)
    else:
        return tl.extra.cuda.libdevice.tanh(x)


@triton.jit
def soft_clamp(x, chans, d_ok, SOFT_CLAMP: tl.constexpr):
    """``tanh(x / c) * c`` (the soft clamp before the stages), and ``t = tanh(x / c)`` for the backward."""
    c = tl.load(chans + COL_SOFT_CLAMP, mask=d_ok, other=1.0)
    if SOFT_CLAMP == 1:
        t = tanh_f32(tl.math.div_rn(x, c))
    else:
        t = tanh_f32(x * tl.load(chans + COL_SOFT_CLAMP_INV, mask=d_ok, other=1.0))
    return t * c, t


@triton.jit
def stage_step(r, srow, d_ok, MAX_LEVEL: tl.constexpr):
    """One stage on the residual ``r``: ``(level, quantized)`` with ``level = #{k : r >= thr[k]}`` and
    ``quantized = table[level]`` (the stage's scaled code), selected with a ``tl.where`` chain (no gather)."""
    COL_Q: tl.constexpr = COL_THRESHOLDS + MAX_LEVEL - 1
    level = tl.zeros(r.shape, dtype=tl.int32)
    quantized = tl.zeros(r.shape, dtype=tl.float32) + tl.load(srow + COL_Q, mask=d_ok, other=0.0)
    if MAX_LEVEL <= 32:
        for k in tl.static_range(MAX_LEVEL - 1):
            passed = r >= tl.load(srow + (COL_THRESHOLDS + k), mask=d_ok, other=float("nan"))
            level += passed.to(tl.int32)
            quantized = tl.where(passed, tl.load(srow + (COL_Q + 1 + k), mask=d_ok, other=0.0), quantized)
    else:
        for k in range(MAX_LEVEL - 1):
            passed = r >= tl.load(srow + (COL_THRESHOLDS + k), mask=d_ok, other=float("nan"))
            level += passed.to(tl.int32)
            quantized = tl.where(passed, tl.load(srow + (COL_Q + 1 + k), mask=d_ok, other=0.0), quantized)
    return level, quantized


@triton.jit
def _group_tile(N, num_n_blocks, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, OFFSET_64: tl.constexpr):
    """This program's (group, channel, token) tile: its origin, the index vectors, each element's channel and the mask."""
    b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
    gg = tl.arange(0, G_PAD)[:, None, None]              # group
    dd = tl.arange(0, D_PAD)[None, :, None]              # channel within the group
    nn = n_start + tl.arange(0, BLOCK_N)[None, None, :]  # token
    chan = gg * D + dd
    if OFFSET_64:
        chan = chan.to(tl.int64)
    d_ok = dd < D
    return b, n_start, gg, dd, nn, chan, d_ok, (gg < G) & d_ok & (nn < N)


@triton.jit
def _residual_forward_kernel(
    x_ptr, out_ptr, idx_ptr, stage_ptr, chan_ptr, basis_ptr,
    N, num_n_blocks, num_active,
    stride_xb, stride_xc, stride_xn,
    stride_ob, stride_oc, stride_on,
    stride_ig, stride_ib, stride_in,
    G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, Q: tl.constexpr,
    MAX_LEVEL: tl.constexpr, SOFT_CLAMP: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET_64: tl.constexpr,
):
    """Residual FSQ forward, all ``Q`` stages in registers, over a tile of ``BLOCK_N`` tokens x all ``g*d`` channels.

    Math, per element ``x`` of channel ``j`` (float32; ``c_j`` the soft clamp, if any):
        r = tanh(x / c_j) * c_j   (or r = x)
        for s < Q:   level_s = #{k : r >= thr[s, j, k]}       (= vqp's stage quantizer of r / scale[s, j])
                     qv_s    = table[s, j, level_s]           (= code(level_s) * scale[s, j], vqp's float32 ops)
                     r       = r - qv_s;  out += qv_s         (stages s >= num_active: index -1, qv_s = 0)
        out = NaN where x is NaN
    per token, group and stage: index = sum_j level_s,j * basis_j, or -1 if a channel is NaN.
    The thresholds were calibrated on this device with vqp's own ops, so the stages are exact (no division, no
    tanh). Only the soft clamp evaluates ``tanh``, after an IEEE division (``div_rn``) or the reciprocal multiply
    torch uses for a Python-float divisor on CUDA. Under the interpreter it is ``torch.tanh`` itself, so the kernel
    is bit-exact there (tested). On CUDA it is libdevice's ``tanhf`` (``__nv_tanhf``, compiled flush-to-zero by
    Triton), the CUDA math library's algorithm that torch's CUDA ``tanh`` also calls (``::tanhf``, not flush-to-zero):
    equal for normal numbers when the two CUDA versions share the algorithm, and a denormal ``x / c`` flushes to
    zero. Not measured on a GPU yet: a one-ulp difference there moves an index only where ``r`` sits within an ulp of
    a deep stage's threshold, and the GPU check must count such mismatches against vqp.

    Memory traffic per element: read ``x`` once (4 B float32, 2 B bfloat16/float16), write ``out`` once (4 B
    float32), and ``4 * q`` B of int32 indices per ``d`` elements; the tables (``q * d`` rows of a few dozen
    floats) stay in cache.
    """
    b, n_start, gg, dd, nn, chan, d_ok, mask = _group_tile(N, num_n_blocks, G, D, G_PAD, D_PAD, BLOCK_N, OFFSET_64)

    x = tl.load(x_ptr + (b * stride_xb + chan * stride_xc + nn * stride_xn), mask=mask, other=0.0).to(tl.float32)
    chans = chan_ptr + dd * CHAN_COLS
    if SOFT_CLAMP != 0:
        r, _t = soft_clamp(x, chans, d_ok, SOFT_CLAMP)
    else:
        r = x
    basis = tl.load(basis_ptr + dd, mask=d_ok, other=0)
    is_nan = x != x
    token_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0          # (G_PAD, BLOCK_N)

    g2 = tl.arange(0, G_PAD)[:, None]
    n2 = n_start + tl.arange(0, BLOCK_N)[None, :]
    if OFFSET_64:
        g2 = g2.to(tl.int64)
    idx_ptrs = idx_ptr + (g2 * stride_ig + b * stride_ib + n2 * stride_in)
    idx_mask = (g2 < G) & (n2 < N)

    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1
    acc = tl.zeros(x.shape, dtype=tl.float32)
    for s in tl.static_range(Q):
        level, quantized = stage_step(r, stage_ptr + (s * D + dd) * ROW, d_ok, MAX_LEVEL)
        dropped = s >= num_active
        index = tl.sum(level * basis, axis=1)
        index = tl.where(token_nan | dropped, -1, index)
        tl.store(idx_ptrs + s, index, mask=idx_mask)
        quantized = tl.where(dropped, 0.0, quantized)
        r = r - quantized
        acc = acc + quantized
    out = tl.where(is_nan, x, acc)
    tl.store(out_ptr + (b * stride_ob + chan * stride_oc + nn * stride_on), cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_backward_kernel(
    g_ptr, x_ptr, dx_ptr, stage_ptr, chan_ptr,
    N, num_n_blocks, num_active,
    stride_gb, stride_gc, stride_gn,
    stride_xb, stride_xc, stride_xn,
    stride_db, stride_dc, stride_dn,
    G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, Q: tl.constexpr,
    MAX_LEVEL: tl.constexpr, KIND: tl.constexpr, SOFT_CLAMP: tl.constexpr, BLOCK_N: tl.constexpr,
    OFFSET_64: tl.constexpr,
):
    """Straight-through gradient of the residual FSQ forward, recomputed from ``x`` alone.

    vqp subtracts ``quantized.detach()`` from the residual, so ``d out / d r_0 = sum_s d quantized_s / d r_s`` with
    ``d r_s / d r_0 = 1``. Per stage (``z = r_s / scale[s, j]``; the scale's multiply and divide cancel):
        tanh_shift:  k_j * (1 - tanh(z + shift_j)^2),  k_j = half_l / half_width
        sym_tanh:    k_j * (1 - tanh(z)^2),            k_j = 2 / (L - 1) / 2 * (L - 1)
        sym_clamp:   k_j if clamp_lo[s, j] <= r_s < clamp_hi[s, j] (i.e. -1 <= z <= 1) else 0
    and through the soft clamp ``1 - tanh(x / c)^2``. Stages at or past ``num_active`` (quantize dropout) add
    nothing. ``1 - tanh^2`` is evaluated as ``4u / (1 + u)^2``, ``u = exp(-2|.|)`` (no cancellation), within a few
    ulp of autograd's ``1 - t * t``; the residuals are recomputed exactly as in the forward.

    Memory traffic per element: read ``g`` (4 B) and ``x`` (4 B float32, 2 B half), write ``dx`` (``x``'s size).
    """
    b, n_start, gg, dd, nn, chan, d_ok, mask = _group_tile(N, num_n_blocks, G, D, G_PAD, D_PAD, BLOCK_N, OFFSET_64)

    g = tl.load(g_ptr + (b * stride_gb + chan * stride_gc + nn * stride_gn), mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + (b * stride_xb + chan * stride_xc + nn * stride_xn), mask=mask, other=0.0).to(tl.float32)
    chans = chan_ptr + dd * CHAN_COLS
    if SOFT_CLAMP != 0:
        r, t = soft_clamp(x, chans, d_ok, SOFT_CLAMP)
    else:
        r = x
    shift = tl.load(chans + COL_SHIFT, mask=d_ok, other=0.0)
    grad_k = tl.load(chans + COL_GRAD_K, mask=d_ok, other=0.0)

    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1
    slope = tl.zeros(x.shape, dtype=tl.float32)
    for s in tl.static_range(Q):
        srow = stage_ptr + (s * D + dd) * ROW
        if KIND == KIND_SYM_CLAMP:
            lo = tl.load(srow + COL_CLAMP_LO, mask=d_ok, other=0.0)
            hi = tl.load(srow + COL_CLAMP_HI, mask=d_ok, other=0.0)
            d_stage = tl.where((r >= lo) & (r < hi), grad_k, 0.0)
        else:
            z = tl.math.div_rn(r, tl.load(srow + COL_SCALE, mask=d_ok, other=1.0)) + shift
            u = tl.exp(-2.0 * tl.abs(z))
            d_stage = grad_k * (4.0 * u / ((1.0 + u) * (1.0 + u)))
        active = s < num_active
        slope += tl.where(active, d_stage, 0.0)
        _level, quantized = stage_step(r, srow, d_ok, MAX_LEVEL)
        r = r - quantized
    dx = g * slope
    if SOFT_CLAMP != 0:
        dx = dx * (1.0 - t * t)
    tl.store(dx_ptr + (b * stride_db + chan * stride_dc + nn * stride_dn), cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

KINDS = {kind: i for i, kind in enumerate(_rl.STAGE_KINDS)}


def _token_axes(b: int, n: int, *tensors: torch.Tensor):
    """(rows, tokens per row, each tensor's (batch, channel, token) strides): when every tensor's batch stride is ``n``
    times its token stride (channel-last contiguous), the batch folds into the token axis, so short sequences still
    fill whole tiles. The indices ``(g, b, n, q)`` always qualify (their token stride is ``q``)."""
    strides = [(t.stride(-3), t.stride(-2), t.stride(-1)) for t in tensors]
    if b > 1 and all(sb == n * sn for sb, _, sn in strides):
        return 1, b * n, [(0, sc, sn) for _, sc, sn in strides]
    return b, n, strides


def _geometry(n: int, groups: int, d: int):
    g_pad, d_pad = _pow2(groups), _pow2(d)
    budget = 2048 if interpreting() else 1024  # elements a tile: Q stages of state stay in registers
    block = max(16, min(1024, _pow2(max(n, 1)), 1 << max(0, (budget // (g_pad * d_pad)).bit_length() - 1)))
    return g_pad, d_pad, block


def forward_triton(x, stages, channels, basis, groups: int, num_active: int, soft_clamp_mode: int, channels_last: bool):
    """x (b, g*d, n) -> out (b, g*d, n) float32 in x's layout, indices (g, b, n, q) int32."""
    q, d = stages.shape[0], stages.shape[1]
    max_level = (stages.shape[2] - _rl.COL_THRESHOLDS + 1) // 2
    b, _, n = x.shape
    out = _empty_feature(x.shape, x.device, channels_last, torch.float32)
    indices = torch.empty((groups, b, n, q), dtype=torch.int32, device=x.device)
    if out.numel() == 0 or (interpreting() and _is_fake(x)):
        return out, indices
    rows, tokens, (sx, so, si) = _token_axes(b, n, x, out, indices.permute(0, 1, 3, 2))
    g_pad, d_pad, block = _geometry(tokens, groups, d)
    nblocks = _cdiv(tokens, block)
    with device_guard(x):
        _launch(_residual_forward_kernel, x)[(rows * nblocks,)](
            x, out, indices, stages, channels, basis,
            tokens, nblocks, num_active,
            *sx, *so, indices.stride(0), si[0], si[2],
            G=groups, D=d, G_PAD=g_pad, D_PAD=d_pad, Q=q, MAX_LEVEL=max_level, SOFT_CLAMP=soft_clamp_mode,
            BLOCK_N=block, OFFSET_64=_needs_int64(x, out, indices), num_warps=4,
        )
    return out, indices


def backward_triton(grad_out, x, stages, channels, groups: int, num_active: int, kind: int, soft_clamp_mode: int,
                    channels_last: bool):
    """grad_out (b, g*d, n), x (b, g*d, n) -> grad_x (b, g*d, n) in x's dtype and layout."""
    q, d = stages.shape[0], stages.shape[1]
    max_level = (stages.shape[2] - _rl.COL_THRESHOLDS + 1) // 2
    b, _, n = x.shape
    grad_x = _empty_feature(x.shape, x.device, channels_last, x.dtype)
    if grad_x.numel() == 0 or (interpreting() and _is_fake(x)):
        return grad_x
    rows, tokens, (sg, sx, sd) = _token_axes(b, n, grad_out, x, grad_x)
    g_pad, d_pad, block = _geometry(tokens, groups, d)
    nblocks = _cdiv(tokens, block)
    with device_guard(x):
        _launch(_residual_backward_kernel, x)[(rows * nblocks,)](
            grad_out, x, grad_x, stages, channels,
            tokens, nblocks, num_active,
            *sg, *sx, *sd,
            G=groups, D=d, G_PAD=g_pad, D_PAD=d_pad, Q=q, MAX_LEVEL=max_level, KIND=kind, SOFT_CLAMP=soft_clamp_mode,
            BLOCK_N=block, OFFSET_64=_needs_int64(grad_out, x, grad_x), num_warps=4,
        )
    return grad_x


def _empty_feature(shape, device, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    b, cd, n = shape
    if channels_last:
        return torch.empty((b, n, cd), dtype=dtype, device=device).transpose(1, 2)
    return torch.empty((b, cd, n), dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# Custom ops (fsq_triton::residual_quantize, fsq_triton::residual_quantize_backward) and the autograd.Function
# --------------------------------------------------------------------------------------------------


def _runs_triton(t: torch.Tensor) -> bool:
    """CUDA tensors (fake ones too, traced through ``wrap_triton``), and real CPU tensors under the interpreter."""
    return t.device.type == "cuda" or (interpreting() and t.device.type == "cpu" and not _is_fake(t))


def _torch_forward(x, stages, channels, basis, groups, num_active, soft_clamp_mode):
    """The kernel's math in torch ops on the tables (the ops' CPU implementation without the interpreter)."""
    tables = _rl.ResidualTables(stages, channels, basis, "")
    b, gd, n = x.shape
    d = gd // groups
    xf = x.float().reshape(b, groups, d, n)
    c = channels[:, _rl.COL_SOFT_CLAMP][:, None]
    if soft_clamp_mode == SOFT_DIVIDE:
        xf = (xf / c).tanh() * c
    elif soft_clamp_mode == SOFT_RECIPROCAL:
        xf = (xf * channels[:, _rl.COL_SOFT_CLAMP_INV][:, None]).tanh() * c
    r, acc, all_idx = xf, torch.zeros_like(xf), []
    nan = x.float().reshape(b, groups, d, n).isnan().any(2)
    for s in range(stages.shape[0]):
        thr, table = tables.thresholds[s], tables.quantized[s]  # (d, L-1), (d, L)
        level = (r[..., None] >= thr[:, None, :]).sum(-1)        # (b, g, d, n)
        qv = table[torch.arange(d, device=x.device)[:, None], level]
        index = (level * basis[:, None]).sum(2)
        active = s < num_active
        all_idx.append(torch.where(nan | (not active), -1, index).to(torch.int32))
        qv = qv if active else torch.zeros_like(qv)
        r = r - qv
        acc = acc + qv
    out = torch.where(xf.isnan(), float("nan"), acc).reshape(b, gd, n)
    return out, torch.stack(all_idx, -1).permute(1, 0, 2, 3).contiguous()


@torch.library.triton_op("fsq_triton::residual_quantize", mutates_args=())
def residual_quantize(
    x: torch.Tensor, stages: torch.Tensor, channels: torch.Tensor, basis: torch.Tensor, groups: int,
    num_active: int, kind: int, soft_clamp_mode: int, channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual FSQ forward on the feature view ``x (b, g*d, n)`` -> ``(out (b, g*d, n) float32, indices (g, b, n, q))``.

    CUDA tensors (real, or fake while torch.compile traces: the launch goes through ``wrap_triton``) and real CPU
    tensors under the interpreter run the kernel; other CPU tensors, fake ones included, the same math in torch ops.
    """
    if _runs_triton(x):
        return forward_triton(x, stages, channels, basis, groups, num_active, soft_clamp_mode, channels_last)
    out, indices = _torch_forward(x, stages, channels, basis, groups, num_active, soft_clamp_mode)
    return _empty_feature(out.shape, out.device, channels_last, out.dtype).copy_(out), indices


@torch.library.triton_op("fsq_triton::residual_quantize_backward", mutates_args=())
def residual_quantize_backward(
    grad_out: torch.Tensor, x: torch.Tensor, stages: torch.Tensor, channels: torch.Tensor, groups: int,
    num_active: int, kind: int, soft_clamp_mode: int, channels_last: bool,
) -> torch.Tensor:
    """Straight-through gradient of :func:`residual_quantize` with respect to ``x``, recomputed from ``x``."""
    if _runs_triton(x):
        return backward_triton(grad_out, x, stages, channels, groups, num_active, kind, soft_clamp_mode, channels_last)
    grad = _torch_backward(grad_out, x.float(), stages, channels, groups, num_active, kind, soft_clamp_mode)
    return _empty_feature(x.shape, x.device, channels_last, x.dtype).copy_(grad)


def _torch_backward(grad_out, x, stages, channels, groups, num_active, kind, soft_clamp_mode):
    tables = _rl.ResidualTables(stages, channels, torch.zeros(1), "")
    b, gd, n = x.shape
    d = gd // groups
    xf = x.reshape(b, groups, d, n)
    c = channels[:, _rl.COL_SOFT_CLAMP][:, None]
    t = None
    if soft_clamp_mode == SOFT_DIVIDE:
        t = (xf / c).tanh()
    elif soft_clamp_mode == SOFT_RECIPROCAL:
        t = (xf * channels[:, _rl.COL_SOFT_CLAMP_INV][:, None]).tanh()
    r = (t * c if t is not None else xf).detach()
    shift, grad_k = channels[:, _rl.COL_SHIFT][:, None], channels[:, _rl.COL_GRAD_K][:, None]
    slope = torch.zeros_like(r)
    ar = torch.arange(d, device=x.device)[:, None]
    for s in range(min(num_active, stages.shape[0])):
        if kind == KINDS["sym_clamp"]:
            lo, hi = stages[s, :, _rl.COL_CLAMP_LO][:, None], stages[s, :, _rl.COL_CLAMP_HI][:, None]
            slope = slope + torch.where((r >= lo) & (r < hi), grad_k, 0.0)
        else:
            z = r / tables.scales[s][:, None] + shift
            slope = slope + grad_k * (1 - z.tanh() ** 2)
        level = (r[..., None] >= tables.thresholds[s][:, None, :]).sum(-1)
        r = r - tables.quantized[s][ar, level]
    dx = grad_out.float().reshape(b, groups, d, n) * slope
    if t is not None:
        dx = dx * (1 - t.detach() * t.detach())
    return dx.reshape(b, gd, n)


def _residual_setup_context(ctx, inputs, output):
    x, stages, channels, _basis, groups, num_active, kind, soft_clamp_mode, channels_last = inputs
    ctx.save_for_backward(x, stages, channels)
    ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
    ctx.mark_non_differentiable(output[1])


def _residual_grad(ctx, grad_out, _grad_indices):
    x, stages, channels = ctx.saved_tensors
    grad_x = torch.ops.fsq_triton.residual_quantize_backward(grad_out, x, stages, channels, *ctx.config)
    return grad_x, None, None, None, None, None, None, None, None


# The op's own gradient, for callers of torch.ops.fsq_triton.residual_quantize; ResidualFSQFunction does the same.
residual_quantize.register_autograd(_residual_grad, setup_context=_residual_setup_context)


class ResidualFSQFunction(torch.autograd.Function):
    """``(out, indices) = ResidualFSQFunction.apply(x, tables, groups, num_active, soft_clamp_mode, channels_last)``
    on the feature view; backward recomputes the stages from the saved ``x``."""

    @staticmethod
    def forward(ctx, x, stages, channels, basis, groups, num_active, kind, soft_clamp_mode, channels_last):
        if torch.compiler.is_compiling() or not _runs_triton(x):
            out, indices = torch.ops.fsq_triton.residual_quantize(
                x, stages, channels, basis, groups, num_active, kind, soft_clamp_mode, channels_last)
        else:
            out, indices = forward_triton(x, stages, channels, basis, groups, num_active, soft_clamp_mode, channels_last)
        ctx.save_for_backward(x, stages, channels)
        ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        x, stages, channels = ctx.saved_tensors
        groups, num_active, kind, soft_clamp_mode, channels_last = ctx.config
        if torch.compiler.is_compiling() or not _runs_triton(x):
            grad_x = torch.ops.fsq_triton.residual_quantize_backward(
                grad_out, x, stages, channels, groups, num_active, kind, soft_clamp_mode, channels_last)
        else:
            grad_x = backward_triton(grad_out, x, stages, channels, groups, num_active, kind, soft_clamp_mode, channels_last)
        return grad_x, None, None, None, None, None, None, None, None
