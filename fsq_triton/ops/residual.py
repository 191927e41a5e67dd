"""Fused residual FSQ: one Triton kernel runs every stage of every group; its backward; the custom ops.

Shape letters: ``b`` batch, ``g`` groups (``GroupedResidualFSQ``; 1 for ``ResidualFSQ``), ``d`` channels per group
(``len(levels)``), ``n`` tokens, ``q`` stages. The kernels work on the *feature view* ``x: (b, g*d, n)`` with any
strides (channel-first ``(b, g*d, *spatial)`` flattened, or channel-last ``(b, n, g*d)`` transposed: no copy), and
write the quantized sum in the same view and the indices as ``(g, b, n, q)`` int32.

A program takes ``BLOCK_N`` tokens of one group (grid axis 1). Each of the ``d`` channels is its own vector of tokens
(the channel loops are unrolled; the vectors are Triton tuples), so every thread holds whole tokens: the index sums
stay in the thread, a channel's per-stage constants are scalars, and nothing crosses lanes or shared memory (sm_90,
triton 3.6 and 3.9; ``bench/inspect_kernels.py``'s residual rows).

With ``project_out`` fused (``fsq_triton::residual_quantize_projected``), the same program then multiplies its
tokens' quantized sums by every feature of the group's ``W_out`` (``BLOCK_K`` features at a time, a 2-D tile whose
rows are tokens) and writes ``proj (b, n, g * dim)`` once; its backward is ``project_out``'s products in torch ops
(cuBLAS) around the straight-through kernel.

The stage math and its calibration are in :mod:`fsq_triton.residual_levels`. Offsets are int64 (``OFFSET_64``)
whenever an address of the launch can pass 2**31.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .. import residual_levels as _rl
from ..levels import cached_calibration, calibration_device
from .fsq import _is_fake, _launch, _needs_int64, cast_rne, device_guard, interpreting, tile_origin
from .fsq_projected import dot_accumulate
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
GUESS_MAGIC = tl.constexpr(_rl.GUESS_MAGIC)
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
    """``tanh`` as torch computes it on the device: libdevice's ``tanhf`` on CUDA, ``torch.tanh`` under the interpreter.

    libdevice's ``__nv_tanhf`` is the CUDA math library's ``tanhf``, the function torch's CUDA ``tanh`` calls (the same
    sm_90 instruction sequence and constants in torch 2.11+cu130's ``tanh_kernel_cuda`` and in triton 3.6's and 3.9's
    libdevice: ``bench/NOTES.md``), except that Triton links it flush-to-zero: a denormal ``x`` would give 0 where
    torch gives ``x`` (its ``tanhf`` of a denormal is ``x`` itself), so denormals pass through unchanged here. For
    every other float the two agree bit for bit as long as the CUDA versions share the algorithm;
    :func:`soft_clamp_matches_torch` checks that on the device before the soft clamp runs in the kernel.
    """
    if INTERPRET:
        return INTERPRETER_TANH(x)
    else:
        denormal = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x00800000
        return tl.where(denormal, x, tl.extra.cuda.libdevice.tanh(x))


@triton.jit
def mul_rn(a, b):
    """``a * b`` rounded once, as torch's own multiply kernel does: ``mul.rn``, which the compiler never fuses with a
    following add (a plain multiply before ``r - q`` may become one fused multiply-add, which skips the rounding of
    the product that torch does in its own kernel). libdevice's, which Triton links flush-to-zero (``mul.rn.ftz``):
    a denormal factor or product gives 0 (:func:`soft_clamp`); an inline non-flushing ``mul.rn.f32`` made ptxas
    spill 4 bytes in the compare-chain kernel on triton 3.9."""
    if INTERPRET:
        return a * b
    else:
        return tl.extra.cuda.libdevice.mul_rn(a, b)


@triton.jit
def div_rn(a, b):
    """``a / b`` correctly rounded (IEEE division, ``div.rn.f32``, denormals kept), as torch divides by a tensor."""
    if INTERPRET:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def soft_clamp(x, chans, SOFT_CLAMP: tl.constexpr):
    """``tanh(x / c) * c`` (the soft clamp before the stages), and ``t = tanh(x / c)`` for the backward; ``chans``
    points at the channel's row of the channel table.

    Three roundings, as torch's three kernels (division, ``tanh``, multiply) round: the division is IEEE
    (``SOFT_DIVIDE``: a tensor ``c``) or the multiply by ``1 / c`` in float32 that torch's CUDA division by a Python
    float performs (``SOFT_RECIPROCAL``), and neither multiply may fuse with the first stage's subtraction
    (:func:`mul_rn`). The first H200 run (2026-11-28) measured 612,934 of 40M indices against vqp, likely from that
    fusion: the kernel then compiled ``tanh(.) * c - q`` into one ``fma.rn.f32`` (its PTX, ``bench/NOTES.md``).
    The one difference left is the products' flush to zero (:func:`mul_rn`): where ``x / c`` (or ``x * (1 / c)``) or
    ``t * c`` is below 2**-126 in magnitude, which needs ``|x| < max(1, |c|) * 2**-126``, the kernel's ``r`` is 0
    where torch's is below ``max(1, |c|) * 2**-126``. The module runs the soft clamp here only where no stage
    threshold lies that close to 0 (``ResidualFSQ._soft_clamp_flush_safe``) and :func:`soft_clamp_matches_torch`
    found the rest equal on the device, so indices and outputs are the same.
    """
    c = tl.load(chans + COL_SOFT_CLAMP)
    if SOFT_CLAMP == 1:
        t = tanh_f32(div_rn(x, c))
    else:
        t = tanh_f32(mul_rn(x, tl.load(chans + COL_SOFT_CLAMP_INV)))
    return mul_rn(t, c), t


@triton.jit
def _probe_kernel(x_ptr, out_ptr, chan_ptr, N, SOFT_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    """The soft clamp's pieces on their own, elementwise over ``N`` contiguous float32 values (:func:`_probe`):
    ``tanh_f32(x)`` with ``SOFT_CLAMP`` 0, else ``soft_clamp(x)`` with the channel row at ``chan_ptr``. Memory
    traffic per element: read 4 B, write 4 B."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SOFT_CLAMP == 0:
        out = tanh_f32(x)
    else:
        out, _t = soft_clamp(x, chan_ptr, SOFT_CLAMP)
    tl.store(out_ptr + offs, out, mask=mask)


def _probe(x: torch.Tensor, chans: torch.Tensor | None, mode: int, reference: torch.Tensor) -> torch.Tensor:
    """Where :func:`_probe_kernel` on ``x`` differs from ``reference`` in a bit (two NaNs agree)."""
    out = torch.empty_like(x)
    block = 1024
    with device_guard(x):
        _launch(_probe_kernel, x)[(_cdiv(x.numel(), block),)](x, out, x if chans is None else chans, x.numel(),
                                                               SOFT_CLAMP=mode, BLOCK=block, num_warps=4)
    return ~((out.view(torch.int32) == reference.view(torch.int32)) | (out.isnan() & reference.isnan()))


# The two branch points of tanhf (the CUDA math library's and libdevice's): the odd polynomial below |x| = 0.6, the
# exponential above it, and 1 from 9.0109 on (as float32 bit patterns).
TANH_BRANCH_BITS = (0x3F19999A, 0x41102CB4)


def tanh_probe_values(device: torch.device | str, stride: int = 1021, window: int = 1 << 15) -> torch.Tensor:
    """The float32 values :func:`tanh_mismatches` feeds both ``tanh``s: every ``stride``-th of the 2**32 bit patterns
    (both signs, every exponent, denormals, infinities, NaNs), the edges of those ranges, and every pattern within
    ``window`` of the two branch points of ``tanhf``, both signs (about 4.5M values by default)."""
    edges = (0, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000)  # 0, denormals, normal, max, inf, NaN
    bits = [torch.arange(0, 1 << 32, stride, dtype=torch.int64), torch.tensor(edges) | (1 << 31), torch.tensor(edges)]
    for point in TANH_BRANCH_BITS:
        near = torch.arange(point - window, point + window, dtype=torch.int64)
        bits += [near, near | (1 << 31)]
    bits = torch.cat(bits)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)  # the same 32 bits, signed
    return bits.view(torch.float32).to(device)


def tanh_mismatches(device: torch.device | str, stride: int = 1021, window: int = 1 << 15) -> int:
    """How many of :func:`tanh_probe_values` the kernels' ``tanh`` (:func:`tanh_f32`) and ``torch.tanh`` evaluate to
    different bits on ``device`` (two NaNs agree)."""
    y = tanh_probe_values(device, stride, window)
    return int(_probe(y, None, SOFT_NONE, torch.tanh(y)).sum())


def soft_clamp_mismatches(device: torch.device | str, c: float, mode: int, stride: int = 1021,
                          window: int = 1 << 15) -> int:
    """How many values ``x`` the kernels' soft clamp (:func:`soft_clamp`, ``mode`` ``SOFT_DIVIDE`` or
    ``SOFT_RECIPROCAL``) and torch's ``(x / c).tanh() * c`` (``c`` a tensor on ``device``, or a Python float)
    evaluate to different bits on ``device`` (two NaNs agree), over :func:`tanh_probe_values` and the same values
    times ``c`` (so that ``x / c`` meets tanh's branch points), outside the products' flush band
    ``|x| < max(1, |c|) * 2**-126`` (:func:`mul_rn`)."""
    y = tanh_probe_values(device, stride, window)
    x = torch.cat([y, y * c])
    c32 = torch.tensor(c, dtype=torch.float32, device=device)
    unused = torch.tensor(float("nan"), device=device)  # the row's shift and gradient constant
    chans = torch.stack([unused, unused, c32, 1.0 / c32]).contiguous()  # as residual_levels builds the row
    c_torch = c if mode == SOFT_RECIPROCAL else c32
    band = x.abs() < max(1.0, abs(c)) * 2.0**-126
    return int((_probe(x, chans, mode, (x / c_torch).tanh() * c_torch) & ~band).sum())


_TANH_CHECKS: dict[str, bool] = {}
_SOFT_CLAMP_CHECKS: dict[tuple, bool] = {}


def soft_clamp_matches_torch(device: torch.device | str, soft_clamp: tuple[float, ...], mode: int) -> bool:
    """Whether the soft clamp may run in the kernel on ``device`` (``ResidualFSQ.soft_clamp_in_kernel``'s default):
    the kernels' ``tanh`` is torch's bit for bit over :func:`tanh_probe_values` (:func:`tanh_mismatches`), and so is
    their whole soft clamp for every value of ``soft_clamp`` in ``mode`` (:func:`soft_clamp_mismatches`). Checked
    once per device, values and mode in a process (about 18 MB of values a launch), at the module's move to the
    device or its first call, never while torch.compile traces (a calibration, as the stage tables). Off CUDA the
    kernels run under the interpreter, whose ``tanh`` is ``torch.tanh`` itself: True."""
    device = calibration_device(device)
    if device.type != "cuda":
        return True

    def check() -> bool:
        try:
            if str(device) not in _TANH_CHECKS:
                _TANH_CHECKS[str(device)] = tanh_mismatches(device) == 0
            return _TANH_CHECKS[str(device)] and all(soft_clamp_mismatches(device, c, mode) == 0
                                                     for c in sorted(set(soft_clamp)))
        except Exception as error:  # a failed compile or launch: the torch ops are exact anyway
            warnings.warn(f"fsq_triton: the soft clamp's check on {device} failed ({type(error).__name__}: {error}); "
                          "ResidualFSQ runs the soft clamp in torch ops there")
            return False

    key = (str(device), tuple(soft_clamp), mode)  # the module's key: float32 values as Python floats
    return cached_calibration(_SOFT_CLAMP_CHECKS, key, "soft clamp's kernel checks", device, check)


@triton.jit
def channel_offset(c, stride, OFFSET_64: tl.constexpr):
    """``c * stride``, in int64 when the launch's addresses need it."""
    if OFFSET_64:
        return stride.to(tl.int64) * c
    else:
        return stride * c


@triton.jit
def split4(tile):
    """The 4 columns of a ``(n, 4)`` tile (each thread holds its rows whole) as 4 vectors."""
    even, odd = tl.split(tl.reshape(tile, [tile.shape[0], 2, 2]))  # columns (0, 2) and (1, 3)
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def join4(c0, c1, c2, c3):
    """The ``(n, 4)`` tile of 4 vectors as its columns (:func:`split4`'s inverse)."""
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [c0.shape[0], 4])


@triton.jit
def load_channels(ptr, offset, nn, n_ok, stride_c, stride_n, first, D: tl.constexpr, C: tl.constexpr,
                  DENSE: tl.constexpr, OFFSET_64: tl.constexpr):
    """Channels ``first .. first + D - 1`` of the tokens ``nn`` as a tuple of ``D`` vectors (the tensor's dtype);
    ``offset`` is the row's. ``DENSE``: channel-last contiguous (token stride ``C``), ``D % 4 == 0`` and aligned, so each
    4 channels of a token are one 16-byte (8-byte) load."""
    out = ()
    if DENSE:
        for k in tl.static_range(D // 4):
            tile = tl.load(ptr + (offset + nn * C + first + 4 * k)[:, None] + tl.arange(0, 4)[None, :],
                           mask=n_ok[:, None], other=0.0)
            out = out + split4(tile)
    else:
        base = offset + channel_offset(first, stride_c, OFFSET_64) + nn * stride_n
        for j in tl.static_range(D):
            out = out + (tl.load(ptr + (base + channel_offset(j, stride_c, OFFSET_64)), mask=n_ok, other=0.0),)
    return out


@triton.jit
def store_channels(ptr, offset, nn, n_ok, stride_c, stride_n, first, values, D: tl.constexpr, C: tl.constexpr,
                   DENSE: tl.constexpr, OFFSET_64: tl.constexpr):
    """Store the tuple of ``D`` channel vectors ``values`` (cast to the tensor's dtype) where :func:`load_channels`
    reads them."""
    if DENSE:
        for k in tl.static_range(D // 4):
            tile = join4(values[4 * k], values[4 * k + 1], values[4 * k + 2], values[4 * k + 3])
            tl.store(ptr + (offset + nn * C + first + 4 * k)[:, None] + tl.arange(0, 4)[None, :],
                     cast_rne(tile, ptr.dtype.element_ty), mask=n_ok[:, None])
    else:
        base = offset + channel_offset(first, stride_c, OFFSET_64) + nn * stride_n
        for j in tl.static_range(D):
            tl.store(ptr + (base + channel_offset(j, stride_c, OFFSET_64)), cast_rne(values[j], ptr.dtype.element_ty),
                     mask=n_ok)


@triton.jit
def group_tile(x_ptr, N, num_n_blocks, stride_xb, stride_xc, stride_xn, D: tl.constexpr, G: tl.constexpr,
               BLOCK_N: tl.constexpr, DENSE: tl.constexpr, OFFSET_64: tl.constexpr):
    """This program's tile, ``(batch row, group, tokens, tokens in range, the group's D channel rows of x)``: programs
    run over ``rows * num_n_blocks`` token blocks (axis 0) and the ``G`` groups (axis 1)."""
    b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
    group = tl.program_id(1)
    nn = n_start + tl.arange(0, BLOCK_N)
    n_ok = nn < N
    raw = load_channels(x_ptr, b * stride_xb, nn, n_ok, stride_xc, stride_xn, group * D, D, G * D, DENSE, OFFSET_64)
    return b, group, nn, n_ok, raw


@triton.jit
def project_in_tokens(x_ptr, offset, nn, n_ok, group, stride_xc, stride_xn, DIM, w_ptr, bias_ptr,
                      D: tl.constexpr, E_PAD: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IEEE_DOT: tl.constexpr, DOT_IN_F32: tl.constexpr, OFFSET_64: tl.constexpr):
    """``project_in`` for the group's ``D`` channels, as ``fsq_triton.ops.fsq_projected`` computes it: ``h = x W_in^T
    (+ b_in)`` over ``BLOCK_K`` features of ``x`` at a time (``x`` cast to the weights' dtype, ``tl.dot`` with float32
    accumulation, ``E_PAD >= 16`` channels with the padding masked), rounded once to the weights' dtype; returned as
    ``D`` float32 vectors of tokens (each column taken out by a sum of one nonzero term: exact). ``W_in`` is every
    group's ``project_in.weight`` stacked, ``(G * D, DIM)`` contiguous. The sum's order is the kernel's own, not
    ``nn.Linear``'s: ``h`` can differ from it by an ulp (see ``ResidualFSQ.fuse_project_in``)."""
    ee = tl.arange(0, E_PAD)
    e_ok = ee < D
    rows = group * D + ee
    acc = tl.zeros([nn.shape[0], E_PAD], dtype=tl.float32)
    k0 = DIM * 0
    while k0 < DIM:  # a runtime bound (see project_out_tokens)
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < DIM
        w = tl.load(w_ptr + (rows[None, :] * DIM + k[:, None]), mask=e_ok[None, :] & k_ok[:, None], other=0.0)
        feature = group * DIM + k
        if OFFSET_64:
            feature = feature.to(tl.int64)
        x = tl.load(x_ptr + (offset + feature[None, :] * stride_xc + nn[:, None] * stride_xn),
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = cast_rne(x, w_ptr.dtype.element_ty)  # nn.Linear (or autocast) feeds x in the weights' dtype
        acc = dot_accumulate(x, w, acc, IEEE_DOT, DOT_IN_F32)
        k0 += BLOCK_K
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rows, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    h = cast_rne(acc, w_ptr.dtype.element_ty).to(tl.float32)
    cols = ()
    for j in tl.static_range(D):
        cols = cols + (tl.sum(tl.where((ee == j)[None, :], h, 0.0), axis=1),)
    return cols


@triton.jit
def project_out_tokens(codes, w_ptr, bias_ptr, out_ptr, offset, nn, n_ok, group, stride_pc, stride_pn, DIM,
                       G: tl.constexpr, D: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       OFFSET_64: tl.constexpr):
    """``project_out`` of the group's quantized sum, as ``nn.Linear(d, DIM)`` computes it, ``BLOCK_K`` features at a
    time: ``out[n, group * DIM + k] = sum_j c_j[n] * W[group * DIM + k, j] (+ bias[group * DIM + k])``, with
    ``c_j = codes[j]`` rounded to ``out``'s dtype first (the weights' or autocast's: ``nn.Linear`` takes its input in
    that dtype), the products summed in float32 in channel order, and the sum rounded once to ``out``'s dtype.
    ``w_ptr`` holds every group's ``project_out.weight`` stacked and transposed, ``(d, G * DIM)`` float32 (its values
    those of the weights in ``out``'s dtype), so each thread's features of a channel are one vector load and need no
    conversion; ``bias_ptr`` ``(G * DIM,)`` float32. ``DIM`` is a runtime value: a constant trip count let triton 3.9
    unroll the loop and hoist its loads (255 registers and spills for ``DIM = 512``, sm_90)."""
    cs = ()
    for j in tl.static_range(D):
        cs = cs + (cast_rne(codes[j], out_ptr.dtype.element_ty).to(tl.float32)[:, None],)
    rows = offset + nn[:, None] * stride_pn
    k0 = DIM * 0
    while k0 < DIM:  # not range(0, DIM, BLOCK_K): triton 3.6's interpreter cannot range over a runtime int
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < DIM
        feature = group * DIM + k
        acc = tl.zeros([nn.shape[0], BLOCK_K], dtype=tl.float32)
        for j in tl.static_range(D):
            w = tl.load(w_ptr + (j * (G * DIM) + feature), mask=k_ok, other=0.0)
            acc = acc + cs[j] * w[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + feature, mask=k_ok, other=0.0)[None, :]
        if OFFSET_64:
            cols = feature.to(tl.int64) * stride_pc
        else:
            cols = feature * stride_pc
        tl.store(out_ptr + (rows + cols[None, :]),
                 cast_rne(acc, out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
        k0 += BLOCK_K


@triton.jit
def stage_chain(r, srow, MAX_LEVEL: tl.constexpr):
    """One stage on a channel's residual ``r`` by the compare chain: ``(level, quantized)`` with
    ``level = #{k : r >= thr[k]}`` and ``quantized = table[level]``, the stage row's thresholds and scaled codes
    read as scalars (one row per channel and stage)."""
    COL_Q: tl.constexpr = COL_THRESHOLDS + MAX_LEVEL - 1
    level = tl.zeros(r.shape, dtype=tl.int32)
    quantized = tl.zeros(r.shape, dtype=tl.float32) + tl.load(srow + COL_Q)
    if MAX_LEVEL <= 32:
        for k in tl.static_range(MAX_LEVEL - 1):
            passed = r >= tl.load(srow + (COL_THRESHOLDS + k))
            level += passed.to(tl.int32)
            quantized = tl.where(passed, tl.load(srow + (COL_Q + 1 + k)), quantized)
    else:
        for k in range(MAX_LEVEL - 1):
            passed = r >= tl.load(srow + (COL_THRESHOLDS + k))
            level += passed.to(tl.int32)
            quantized = tl.where(passed, tl.load(srow + (COL_Q + 1 + k)), quantized)
    return level, quantized


@triton.jit
def stage_guess(r, guess_ptr, s: tl.constexpr, j: tl.constexpr, D: tl.constexpr, a, b, ROWS: tl.constexpr):
    """One stage on a channel's residual ``r`` by guess and correction (:func:`fsq_triton.residual_levels.guess_table`):
    ``i = clamp(bits(fl(r * a + b)) - GUESS_MAGIC, 0, ROWS - 1)`` (``b`` holds ``2**22``: ``i`` counts half levels),
    then row ``1 + i`` of the stage's guess table gives ``(t_i, quantized[lo], quantized[lo + 1], lo * basis)``:
    ``passed = r >= t_i``, and the result is ``(passed, quantized, lo * basis)`` with
    ``quantized = passed ? quantized[lo + 1] : quantized[lo]``."""
    i = tl.fma(r, a, b).to(tl.int32, bitcast=True)  # exact fused or not; fused: one instruction on any Triton
    i = tl.minimum(tl.maximum(i, GUESS_MAGIC), GUESS_MAGIC + (ROWS - 1))
    # row 1 + i of stage s, channel j: (guess_ptr - 4 * GUESS_MAGIC) + 4 * (GUESS_MAGIC + i) (one 64-bit multiply-add,
    # the same base for every stage) + a constant (the load's immediate offset)
    rows = (guess_ptr + (-4 * GUESS_MAGIC)) + i.to(tl.uint32).to(tl.int64) * 4
    entry = tl.load(rows[:, None] + ((s * D + j) * (4 * (ROWS + 1)) + 4 + tl.arange(0, 4))[None, :])  # a 16-byte row
    even, odd = tl.split(tl.reshape(entry, [r.shape[0], 2, 2]))  # columns (0, 2) and (1, 3)
    thr, q_hi = tl.split(even)
    q_lo, part = tl.split(odd)
    passed = r >= thr
    quantized = tl.where(passed, q_hi, q_lo)
    return passed, quantized, part.to(tl.int32, bitcast=True)


@triton.jit
def guess_line(guess_ptr, s: tl.constexpr, j: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    """``(a, b)``, the guess line of stage ``s`` and channel ``j`` (row 0 of its guess table): one 8-byte load."""
    ab = tl.load((guess_ptr + (s * D + j) * (4 * (ROWS + 1))).to(tl.pointer_type(tl.int64), bitcast=True))
    return ab.to(tl.int32).to(tl.float32, bitcast=True), (ab >> 32).to(tl.int32).to(tl.float32, bitcast=True)


# The token strides are never specialised to a constexpr 1 (channel-first): their loads would then hold 4 consecutive
# tokens a thread, while the guess table's 16-byte rows are gathered round-robin (token t in thread t mod 128), and
# Triton would convert between the two through shared memory (sm_90, triton 3.6 and 3.9).
@triton.jit(do_not_specialize=["stride_xn", "stride_on"])
def _residual_forward_kernel(
    x_ptr, out_ptr, idx_ptr, stage_ptr, guess_ptr, chan_ptr, basis_ptr,
    proj_ptr, w_out_ptr, b_out_ptr,
    N, num_n_blocks, num_active, proj_dim,
    stride_xb, stride_xc, stride_xn,
    stride_ob, stride_oc, stride_on,
    stride_ig, stride_ib, stride_in,
    stride_pb, stride_pc, stride_pn,
    G: tl.constexpr, D: tl.constexpr, Q: tl.constexpr, MAX_LEVEL: tl.constexpr, SOFT_CLAMP: tl.constexpr,
    GUESS_ROWS: tl.constexpr, DENSE: tl.constexpr, INDEX_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    OFFSET_64: tl.constexpr, PROJECT_OUT: tl.constexpr = False, BLOCK_K: tl.constexpr = 16,
    HAS_B_OUT: tl.constexpr = False,
    w_in_ptr=None, b_in_ptr=None, h_ptr=None, stride_hb=0, stride_hc=0, stride_hn=0,
    PROJECT_IN: tl.constexpr = False, HAS_B_IN: tl.constexpr = False, E_PAD: tl.constexpr = 16,
    BLOCK_KI: tl.constexpr = 32, IEEE_DOT: tl.constexpr = False, DOT_IN_F32: tl.constexpr = False,
):
    """Residual FSQ forward, all ``Q`` stages in registers, over ``BLOCK_N`` tokens x the ``D`` channels of one group.

    Math, per element ``x`` of channel ``j`` (float32; ``c_j`` the soft clamp, if any):
        r = tanh(x / c_j) * c_j   (or r = x)
        for s < Q:   level_s = #{k : r >= thr[s, j, k]}       (= vqp's stage quantizer of r / scale[s, j])
                     qv_s    = table[s, j, level_s]           (= code(level_s) * scale[s, j], vqp's float32 ops)
                     r       = r - qv_s;  out += qv_s         (stages s >= num_active: skipped, index -1)
        out = x where x is NaN
    per token, group and stage: index = sum_j level_s,j * basis_j, or -1 if a channel is NaN.
    ``level_s`` and ``qv_s`` come from the guess table with ``GUESS_ROWS`` (its rows a stage; a multiply-add places
    ``r`` on a grid of half levels, one threshold corrects: :func:`stage_guess`, exact as proven in
    :func:`fsq_triton.residual_levels.guess_table`),
    else from the compare chain over the ``L - 1`` thresholds (:func:`stage_chain`); the same integers and floats.
    The thresholds were calibrated on this device with vqp's own ops, so the stages are exact (no division, no
    tanh). Only the soft clamp evaluates ``tanh`` (:func:`soft_clamp`: torch's three roundings, its products never
    fused; under the interpreter ``torch.tanh`` itself, on CUDA libdevice's ``tanhf``, the algorithm of torch's CUDA
    ``tanh``, which :func:`soft_clamp_matches_torch` checks on the device before the module puts the soft clamp here).

    A thread holds whole tokens (see the module docstring). ``DENSE`` (channel-last contiguous, ``d % 4 == 0``):
    each 4 channels of a token are one 16-byte load and store; ``INDEX_ROWS`` (``q % 4 == 0``): each 4 stage indices
    of a token are one 16-byte store. sm_90, 8 stages of [8, 5, 5, 5], float32 channel-last: 116 SASS instructions
    per value (16 a thread, 160 registers, no spills, no shared memory; triton 3.6 and 3.9), against 444 for the
    compare chain over lanes before (compiler figures, not GPU timings: ``bench/NOTES.md``).

    ``PROJECT_IN`` (``project_in`` fused, :func:`project_in_tokens`, only with ``PROJECT_OUT``): ``x`` is the
    module's input, ``(b, g * proj_dim, n)``, and the stages run on ``h = x W_in^T + b_in``, which is also written to
    ``h_ptr`` (float32, the feature view) for the backward.
    ``PROJECT_OUT`` (``project_out`` fused, :func:`project_out_tokens`; ``w_out_ptr`` and ``b_out_ptr`` float32, the
    weights transposed): also write ``proj = out W_out^T + b_out``
    (``proj_dim`` features a group, in ``proj``'s dtype, the weights' or autocast's) through its strides.

    Memory traffic per element: read ``x`` once (4 B float32, 2 B bfloat16/float16), write ``out`` once (4 B
    float32), and ``4 * q`` B of int32 indices per ``d`` elements; the tables (``q * d`` rows of a few dozen floats,
    and the guess table's ``q * d * max(L)`` 16-byte rows) stay in cache. With ``PROJECT_OUT``, per token and group,
    ``proj_dim`` values of ``proj`` more (2 B each in bfloat16; ``W_out`` and ``b_out``, ``proj_dim * (d + 1)`` values a group,
    stay in cache). With ``PROJECT_IN``, per token and group, ``x`` is ``proj_dim`` values (not ``d``) and ``h``,
    ``4 d`` B, is written too (``W_in``, ``d * proj_dim`` values a group, stays in cache).
    """
    if PROJECT_IN:  # x is the module's input (b, g * proj_dim, n): h = project_in(x), saved for the backward
        b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
        group = tl.program_id(1)
        nn = n_start + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        raw = project_in_tokens(x_ptr, b * stride_xb, nn, n_ok, group, stride_xc, stride_xn, proj_dim, w_in_ptr,
                                b_in_ptr, D, E_PAD, BLOCK_KI, HAS_B_IN, IEEE_DOT, DOT_IN_F32, OFFSET_64)
        store_channels(h_ptr, b * stride_hb, nn, n_ok, stride_hc, stride_hn, group * D, raw, D, G * D, DENSE, OFFSET_64)
    else:
        b, group, nn, n_ok, raw = group_tile(x_ptr, N, num_n_blocks, stride_xb, stride_xc, stride_xn, D, G, BLOCK_N,
                                             DENSE, OFFSET_64)
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1
    xs = ()
    rs = ()
    accs = ()
    bases = ()
    token_nan = tl.zeros([BLOCK_N], dtype=tl.int1)
    for j in tl.static_range(D):
        bases = bases + (tl.load(basis_ptr + j),)
        x = raw[j].to(tl.float32)
        if SOFT_CLAMP != 0:
            r, _t = soft_clamp(x, chan_ptr + j * CHAN_COLS, SOFT_CLAMP)
        else:
            r = x
        token_nan = token_nan | (x != x)
        xs = xs + (x,)
        rs = rs + (r,)
        accs = accs + (tl.zeros([BLOCK_N], dtype=tl.float32),)

    # indices (g, b, n, q): with INDEX_ROWS (q % 4 == 0) the group and batch strides come divided by 4, the token
    # stride is q, and each 4 stages of a token go out as one 16-byte store
    if INDEX_ROWS:
        idx_rows = idx_ptr + (4 * (channel_offset(group, stride_ig, OFFSET_64) + b * stride_ib) + nn * Q)
    else:
        idx_rows = idx_ptr + (channel_offset(group, stride_ig, OFFSET_64) + b * stride_ib + nn * stride_in)
    pending = ()
    for s in tl.static_range(Q):
        if s < num_active:
            new_rs = ()
            new_accs = ()
            index = tl.zeros([BLOCK_N], dtype=tl.int32)
            for j in tl.static_range(D):
                r = rs[j]
                if GUESS_ROWS > 0:
                    a, bb = guess_line(guess_ptr, s, j, D, GUESS_ROWS)
                    passed, quantized, part = stage_guess(r, guess_ptr, s, j, D, a, bb, GUESS_ROWS)
                    index += part + tl.where(passed, bases[j], 0)
                else:
                    level, quantized = stage_chain(r, stage_ptr + (s * D + j) * ROW, MAX_LEVEL)
                    index += level * bases[j]
                new_rs = new_rs + (r - quantized,)
                new_accs = new_accs + (accs[j] + quantized,)
            rs = new_rs
            accs = new_accs
            index = tl.where(token_nan, -1, index)
        else:
            index = tl.full([BLOCK_N], -1, dtype=tl.int32)
        if INDEX_ROWS:
            pending = pending + (index,)
            if s % 4 == 3:
                tl.store((idx_rows + (s - 3))[:, None] + tl.arange(0, 4)[None, :],
                         join4(pending[0], pending[1], pending[2], pending[3]), mask=n_ok[:, None])
                pending = ()
        else:
            tl.store(idx_rows + s, index, mask=n_ok)
    outs = ()
    for j in tl.static_range(D):
        outs = outs + (tl.where(xs[j] != xs[j], xs[j], accs[j]),)
    store_channels(out_ptr, b * stride_ob, nn, n_ok, stride_oc, stride_on, group * D, outs, D, G * D, DENSE, OFFSET_64)
    if PROJECT_OUT:
        project_out_tokens(outs, w_out_ptr, b_out_ptr, proj_ptr, b * stride_pb, nn, n_ok, group, stride_pc, stride_pn,
                           proj_dim, G, D, BLOCK_K, HAS_B_OUT, OFFSET_64)


@triton.jit(do_not_specialize=["stride_gn", "stride_xn", "stride_dn"])
def _residual_backward_kernel(
    g_ptr, x_ptr, dx_ptr, stage_ptr, guess_ptr, chan_ptr,
    N, num_n_blocks, num_active,
    stride_gb, stride_gc, stride_gn,
    stride_xb, stride_xc, stride_xn,
    stride_db, stride_dc, stride_dn,
    G: tl.constexpr, D: tl.constexpr, Q: tl.constexpr, MAX_LEVEL: tl.constexpr, KIND: tl.constexpr,
    SOFT_CLAMP: tl.constexpr, GUESS_ROWS: tl.constexpr, DENSE: tl.constexpr, BLOCK_N: tl.constexpr,
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
    ulp of autograd's ``1 - t * t``; the residuals are recomputed exactly as in the forward (guess and correction
    with ``GUESS_ROWS``, else the compare chain). A program and its threads are laid out as in the forward.

    Memory traffic per element: read ``g`` (4 B) and ``x`` (4 B float32, 2 B half), write ``dx`` (``x``'s size).
    """
    b, group, nn, n_ok, raw = group_tile(x_ptr, N, num_n_blocks, stride_xb, stride_xc, stride_xn, D, G, BLOCK_N,
                                         DENSE, OFFSET_64)
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1
    rs = ()
    ts = ()
    slopes = ()
    for j in tl.static_range(D):
        x = raw[j].to(tl.float32)
        if SOFT_CLAMP != 0:
            r, t = soft_clamp(x, chan_ptr + j * CHAN_COLS, SOFT_CLAMP)
        else:
            r = x
            t = x
        rs = rs + (r,)
        ts = ts + (t,)
        slopes = slopes + (tl.zeros([BLOCK_N], dtype=tl.float32),)

    for s in tl.static_range(Q):
        if s < num_active:
            new_rs = ()
            new_slopes = ()
            for j in tl.static_range(D):
                r = rs[j]
                srow = stage_ptr + (s * D + j) * ROW
                grad_k = tl.load(chan_ptr + j * CHAN_COLS + COL_GRAD_K)
                if KIND == KIND_SYM_CLAMP:
                    inside = (r >= tl.load(srow + COL_CLAMP_LO)) & (r < tl.load(srow + COL_CLAMP_HI))
                    d_stage = tl.where(inside, grad_k, 0.0)
                else:
                    z = tl.math.div_rn(r, tl.load(srow + COL_SCALE)) + tl.load(chan_ptr + j * CHAN_COLS + COL_SHIFT)
                    u = tl.exp(-2.0 * tl.abs(z))
                    d_stage = grad_k * (4.0 * u / ((1.0 + u) * (1.0 + u)))
                new_slopes = new_slopes + (slopes[j] + d_stage,)
                if s + 1 < Q:  # the last stage's residual is not needed
                    if GUESS_ROWS > 0:
                        a, bb = guess_line(guess_ptr, s, j, D, GUESS_ROWS)
                        _passed, quantized, _part = stage_guess(r, guess_ptr, s, j, D, a, bb, GUESS_ROWS)
                    else:
                        _level, quantized = stage_chain(r, srow, MAX_LEVEL)
                    r = r - quantized
                new_rs = new_rs + (r,)
            rs = new_rs
            slopes = new_slopes
    gs = load_channels(g_ptr, b * stride_gb, nn, n_ok, stride_gc, stride_gn, group * D, D, G * D, DENSE, OFFSET_64)
    dxs = ()
    for j in tl.static_range(D):
        dx = gs[j].to(tl.float32) * slopes[j]
        if SOFT_CLAMP != 0:
            dx = dx * (1.0 - ts[j] * ts[j])
        dxs = dxs + (dx,)
    store_channels(dx_ptr, b * stride_db, nn, n_ok, stride_dc, stride_dn, group * D, dxs, D, G * D, DENSE, OFFSET_64)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

KINDS = {kind: i for i, kind in enumerate(_rl.STAGE_KINDS)}


def _token_axes(b: int, n: int, *tensors: torch.Tensor):
    """(rows, tokens per row, each tensor's (batch, channel, token) strides): when every tensor's batch stride is ``n``
    times its token stride (channel-last contiguous), the batch folds into the token axis, so short sequences still
    fill whole tiles. The indices ``(g, b, n, q)`` always qualify (their token stride is ``q``). With one row the
    batch strides are passed as 0 (the kernels see them aligned)."""
    strides = [(t.stride(-3), t.stride(-2), t.stride(-1)) for t in tensors]
    if b == 1 or all(sb == n * sn for sb, _, sn in strides):
        return 1, b * n, [(0, sc, sn) for _, sc, sn in strides]
    return b, n, strides


def _dense(rows: int, channels: int, d: int, *tensors: torch.Tensor) -> bool:
    """The kernels' ``DENSE``: one row of tokens (:func:`_token_axes`), every tensor channel-last contiguous (channel
    stride 1, token stride ``channels = g * d``), ``d % 4 == 0`` and each tensor's data 16-byte aligned (the
    allocation's base is; Triton marks the pointer so), so that each 4 channels of a token are one vector access.
    The kernels then take the token stride as the constexpr ``channels``."""
    return rows == 1 and d % 4 == 0 and all(
        t.stride(-2) == 1 and (t.shape[-1] <= 1 or t.stride(-1) == channels)
        and t.storage_offset() * t.element_size() % 16 == 0 for t in tensors)


def _tile(n: int, d: int) -> tuple[int, int]:
    """``(BLOCK_N, num_warps)``: each thread holds whole tokens (the ``d`` channels of one group), about 16 values
    (4 tokens of 4 channels: sm_90 keeps them and a stage's gathered rows in 160 registers, no spills; 8 tokens
    spill), on 4 warps, fewer for short inputs."""
    per_thread = 1 << (max(1, 16 // d).bit_length() - 1)  # a power of two
    block = max(16, min(_pow2(max(n, 1)), 128 * per_thread))
    return block, max(1, min(4, block // 32))


def check_projections(groups: int, d: int, w_out: torch.Tensor, b_out: torch.Tensor | None,
                      w_in: torch.Tensor | None = None, b_in: torch.Tensor | None = None,
                      x_channels: int | None = None) -> None:
    """``ValueError`` unless the stacked projections fit ``groups`` groups of ``d`` channels: ``w_out (g * dim, d)``,
    ``b_out (g * dim,)``, ``w_in (g * d, dim)`` against ``x``'s ``g * dim`` features, ``b_in (g * d,)``, all of one
    floating dtype (the kernel reads the biases by feature, so a short one would be read past its end)."""
    def bad(what):
        return ValueError(f"residual projections for {groups} groups of {d} channels: {what}")

    if w_out.ndim != 2 or w_out.shape[1] != d or w_out.shape[0] % groups != 0:
        raise bad(f"w_out must be (groups * dim, {d}), found {tuple(w_out.shape)}")
    dim = w_out.shape[0] // groups
    expected = {"w_out": (w_out, (groups * dim, d)), "b_out": (b_out, (groups * dim,))}
    if w_in is not None:
        expected.update(w_in=(w_in, (groups * d, dim)), b_in=(b_in, (groups * d,)))
        if x_channels != groups * dim:
            raise bad(f"x has {x_channels} features where project_in takes {groups} x {dim}")
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise bad(f"{name} must be {shape}, found {tuple(t.shape)}")
        if t.dtype != w_out.dtype or not t.is_floating_point():
            raise bad(f"{name} is {t.dtype}; every projection tensor must share w_out's floating dtype ({w_out.dtype})")


def _projected_tile(n: int, dim: int) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, BLOCK_K)`` with ``project_out`` fused: 4 warps, the projection ``BLOCK_K = 32`` features at
    a time. Each token writes ``dim`` features, so a tile of 128 tokens is already ``128 * dim`` values, and more
    programs keep every SM busy. When ``dim % 16 == 0`` Triton knows the rows of ``proj`` aligned (it marks such ints
    divisible by 16) and gives each thread a few tokens x 8 consecutive features (16-byte stores: 64 registers on
    triton 3.6, 80 on 3.9, no spills, sm_90); otherwise its lanes run along the features and each thread holds
    ``BLOCK_N / 4`` tokens' codes (128 tokens: 255 registers and spills), so the tile shrinks to 32 tokens there.
    ``ResidualFSQ`` fuses ``project_out`` only for ``dim % 16 == 0``; other widths stay correct through the op."""
    block = max(16, min(_pow2(max(n, 1)), 128 if dim % 16 == 0 else 32))
    return block, max(1, min(4, block // 32)), 32


def forward_triton(x, stages, guess, channels, basis, groups: int, num_active: int, soft_clamp_mode: int,
                   channels_last: bool, w_out=None, b_out=None, w_in=None, b_in=None):
    """x (b, g*d, n) -> out (b, g*d, n) float32 in x's layout, indices (g, b, n, q) int32. ``guess``: the stages'
    guess table, or an empty one (the compare chain).

    With ``w_out`` (every group's ``project_out.weight`` stacked, ``(g * dim, d)``, in the dtype ``project_out``
    computes in) and ``b_out`` (``(g * dim,)`` or None), ``project_out`` is fused: returns ``(proj (b, n, g * dim) in
    w_out's dtype, out, indices)``. With ``w_in`` too (every group's ``project_in.weight`` stacked, ``(g * d, dim)``,
    in the dtype ``project_in`` computes in; ``b_in`` ``(g * d,)`` or None), ``x`` is the module's input
    ``(b, g * dim, n)`` and ``project_in`` is fused as well: returns ``(proj, h (b, g*d, n) float32, out, indices)``."""
    q, d = stages.shape[0], stages.shape[1]
    max_level = (stages.shape[2] - _rl.COL_THRESHOLDS + 1) // 2
    b, n = x.shape[0], x.shape[2]
    project_in = w_in is not None
    feature_shape = (b, groups * d, n)
    out = _empty_feature(feature_shape, x.device, channels_last, torch.float32)
    h = _empty_feature(feature_shape, x.device, channels_last, torch.float32) if project_in else out
    indices = torch.empty((groups, b, n, q), dtype=torch.int32, device=x.device)
    project = w_out is not None
    if project:
        dim = w_out.shape[0] // groups
        proj = torch.empty((b, n, groups * dim), dtype=w_out.dtype, device=x.device)
        check_projections(groups, d, w_out, b_out, w_in, b_in, x.shape[1] if project_in else None)
        # the kernel reads the weights transposed in float32 (exact: their values in w_out's dtype), one vector a
        # channel, and the bias in float32: one small copy each
        w_t = torch.empty((d, groups * dim), dtype=torch.float32, device=x.device).copy_(w_out.t())
        b_f = None if b_out is None else b_out.float()
        result = (proj, h, out, indices) if project_in else (proj, out, indices)
    else:
        dim, proj, result = 1, out, (out, indices)
    if out.numel() == 0 or (interpreting() and _is_fake(x)):
        return result
    proj_view = proj.transpose(1, 2) if project else out
    rows, tokens, (sx, so, si, sp, sh) = _token_axes(b, n, x, out, indices.permute(0, 1, 3, 2), proj_view, h)
    if project:
        block, warps, block_k = _projected_tile(tokens, dim)
    else:
        (block, warps), block_k = _tile(tokens, d), 16
    nblocks = _cdiv(tokens, block)
    guess_rows = guess.shape[2] - 1 if guess.shape[0] > 0 else 0
    index_rows = q % 4 == 0  # the (g, b, n, q) strides are multiples of 4: passed divided by 4 (see the kernel)
    idx_strides = (indices.stride(0) // 4, si[0] // 4, si[2]) if index_rows else (indices.stride(0), si[0], si[2])
    with device_guard(x):
        _launch(_residual_forward_kernel, x)[(rows * nblocks, groups)](
            x, out, indices, stages, guess if guess_rows else stages, channels, basis,
            proj, w_t if project else stages, b_f if project and b_f is not None else stages,
            tokens, nblocks, num_active, dim,
            *sx, *so, *idx_strides, *(sp if project else (0, 0, 0)),
            G=groups, D=d, Q=q, MAX_LEVEL=max_level, SOFT_CLAMP=soft_clamp_mode, GUESS_ROWS=guess_rows,
            DENSE=_dense(rows, groups * d, d, *((out, h) if project_in else (x, out))), INDEX_ROWS=index_rows,
            BLOCK_N=block, OFFSET_64=_needs_int64(x, out, indices, *((proj,) if project else ())),
            PROJECT_OUT=project, BLOCK_K=block_k, HAS_B_OUT=b_out is not None,
            **(dict(w_in_ptr=w_in, b_in_ptr=b_in if b_in is not None else w_in, h_ptr=h, stride_hb=sh[0],
                    stride_hc=sh[1], stride_hn=sh[2], PROJECT_IN=True, HAS_B_IN=b_in is not None,
                    E_PAD=max(16, _pow2(d)), BLOCK_KI=32, IEEE_DOT=w_in.dtype == torch.float32,
                    DOT_IN_F32=interpreting()) if project_in else {}),
            num_warps=warps,
        )
    return result


def backward_triton(grad_out, x, stages, guess, channels, groups: int, num_active: int, kind: int,
                    soft_clamp_mode: int, channels_last: bool):
    """grad_out (b, g*d, n), x (b, g*d, n) -> grad_x (b, g*d, n) in x's dtype and layout."""
    q, d = stages.shape[0], stages.shape[1]
    max_level = (stages.shape[2] - _rl.COL_THRESHOLDS + 1) // 2
    b, _, n = x.shape
    grad_x = _empty_feature(x.shape, x.device, channels_last, x.dtype)
    if grad_x.numel() == 0 or (interpreting() and _is_fake(x)):
        return grad_x
    rows, tokens, (sg, sx, sd) = _token_axes(b, n, grad_out, x, grad_x)
    block, warps = _tile(tokens, d)
    nblocks = _cdiv(tokens, block)
    guess_rows = guess.shape[2] - 1 if guess.shape[0] > 0 else 0
    with device_guard(x):
        _launch(_residual_backward_kernel, x)[(rows * nblocks, groups)](
            grad_out, x, grad_x, stages, guess if guess_rows else stages, channels,
            tokens, nblocks, num_active,
            *sg, *sx, *sd,
            G=groups, D=d, Q=q, MAX_LEVEL=max_level, KIND=kind, SOFT_CLAMP=soft_clamp_mode, GUESS_ROWS=guess_rows,
            DENSE=_dense(rows, groups * d, d, grad_out, x, grad_x), BLOCK_N=block,
            OFFSET_64=_needs_int64(grad_out, x, grad_x), num_warps=warps,
        )
    return grad_x


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A copy of the feature view ``t (b, c, n)`` in the layout the kernels write (the ops' torch branches)."""
    return _empty_feature(t.shape, t.device, channels_last, t.dtype).copy_(t)


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
    x: torch.Tensor, stages: torch.Tensor, guess: torch.Tensor, channels: torch.Tensor, basis: torch.Tensor,
    groups: int, num_active: int, kind: int, soft_clamp_mode: int, channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual FSQ forward on the feature view ``x (b, g*d, n)`` -> ``(out (b, g*d, n) float32, indices (g, b, n, q))``.

    CUDA tensors (real, or fake while torch.compile traces: the launch goes through ``wrap_triton``) and real CPU
    tensors under the interpreter run the kernel; other CPU tensors, fake ones included, the same math in torch ops.
    """
    if _runs_triton(x):
        return forward_triton(x, stages, guess, channels, basis, groups, num_active, soft_clamp_mode, channels_last)
    out, indices = _torch_forward(x, stages, channels, basis, groups, num_active, soft_clamp_mode)
    return _in_layout(out, channels_last), indices


@torch.library.triton_op("fsq_triton::residual_quantize_backward", mutates_args=())
def residual_quantize_backward(
    grad_out: torch.Tensor, x: torch.Tensor, stages: torch.Tensor, guess: torch.Tensor, channels: torch.Tensor,
    groups: int, num_active: int, kind: int, soft_clamp_mode: int, channels_last: bool,
) -> torch.Tensor:
    """Straight-through gradient of :func:`residual_quantize` with respect to ``x``, recomputed from ``x``."""
    if _runs_triton(x):
        return backward_triton(grad_out, x, stages, guess, channels, groups, num_active, kind, soft_clamp_mode,
                               channels_last)
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


def _refuse_double_backward() -> None:
    """The backward kernels leave no graph: under ``create_graph=True`` (grad mode on in a backward) the second
    derivative would silently miss their terms, so refuse it (the torch path has them)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise NotImplementedError(
            "double backward (create_graph=True) through fsq_triton's fused residual kernels is not supported: their "
            "backward is a kernel; use backend='torch' (vqp's ops) for second derivatives")


def _residual_setup_context(ctx, inputs, output):
    x, stages, guess, channels, _basis, groups, num_active, kind, soft_clamp_mode, channels_last = inputs
    ctx.save_for_backward(x, stages, guess, channels)
    ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
    ctx.mark_non_differentiable(output[1])


def _residual_grad(ctx, grad_out, _grad_indices):
    _refuse_double_backward()
    x, stages, guess, channels = ctx.saved_tensors
    grad_x = torch.ops.fsq_triton.residual_quantize_backward(grad_out, x, stages, guess, channels, *ctx.config)
    return grad_x, None, None, None, None, None, None, None, None, None


# The op's own gradient, for callers of torch.ops.fsq_triton.residual_quantize; ResidualFSQFunction does the same.
residual_quantize.register_autograd(_residual_grad, setup_context=_residual_setup_context)


class ResidualFSQFunction(torch.autograd.Function):
    """``(out, indices) = ResidualFSQFunction.apply(x, stages, guess, channels, basis, groups, num_active, kind,
    soft_clamp_mode, channels_last)`` on the feature view; backward recomputes the stages from the saved ``x``."""

    @staticmethod
    def forward(ctx, x, stages, guess, channels, basis, groups, num_active, kind, soft_clamp_mode, channels_last):
        if torch.compiler.is_compiling() or not _runs_triton(x):
            out, indices = torch.ops.fsq_triton.residual_quantize(
                x, stages, guess, channels, basis, groups, num_active, kind, soft_clamp_mode, channels_last)
        else:
            out, indices = forward_triton(x, stages, guess, channels, basis, groups, num_active, soft_clamp_mode,
                                          channels_last)
        ctx.save_for_backward(x, stages, guess, channels)
        ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        _refuse_double_backward()
        x, stages, guess, channels = ctx.saved_tensors
        groups, num_active, kind, soft_clamp_mode, channels_last = ctx.config
        if torch.compiler.is_compiling() or not _runs_triton(x):
            grad_x = torch.ops.fsq_triton.residual_quantize_backward(
                grad_out, x, stages, guess, channels, groups, num_active, kind, soft_clamp_mode, channels_last)
        else:
            grad_x = backward_triton(grad_out, x, stages, guess, channels, groups, num_active, kind, soft_clamp_mode,
                                     channels_last)
        return grad_x, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# project_out fused (fsq_triton::residual_quantize_projected) and its autograd.Function
# --------------------------------------------------------------------------------------------------


def _project_groups(out: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor | None, groups: int) -> torch.Tensor:
    """``project_out`` of each group's quantized sum in torch ops, summed in the kernel's order (the codes rounded to
    the weights' dtype, the products in float32 in channel order, the bias last, one rounding to the weights' dtype):
    out (b, g*d, n) float32 -> (b, n, g * dim). Bit for bit the interpreted kernel's; on a GPU the kernel fuses each
    multiply-add into one FMA (one rounding fewer: float32 weights may then differ by an ulp, half-precision ones not,
    their products being exact)."""
    b, gd, n = out.shape
    d, dim = gd // groups, w_out.shape[0] // groups
    codes = out.to(w_out.dtype).float().reshape(b, groups, d, n).permute(0, 3, 1, 2)  # b n g d
    w = w_out.float().reshape(groups, dim, d)
    acc = codes[..., 0:1] * w[:, :, 0]
    for j in range(1, d):
        acc = acc + codes[..., j:j + 1] * w[:, :, j]
    if b_out is not None:
        acc = acc + b_out.float().reshape(groups, dim)
    return acc.reshape(b, n, groups * dim).to(w_out.dtype)


@torch.library.triton_op("fsq_triton::residual_quantize_projected", mutates_args=())
def residual_quantize_projected(
    x: torch.Tensor, stages: torch.Tensor, guess: torch.Tensor, channels: torch.Tensor, basis: torch.Tensor,
    w_out: torch.Tensor, b_out: torch.Tensor | None, groups: int, num_active: int, kind: int, soft_clamp_mode: int,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`residual_quantize` with ``project_out`` fused: ``(proj (b, n, g * dim) in w_out's dtype, out (b, g*d, n)
    float32, indices (g, b, n, q))``, ``proj`` each group's ``out @ W_out^T + b_out`` (``w_out`` stacked over the groups,
    ``(g * dim, d)``; ``b_out`` ``(g * dim,)`` or None)."""
    if _runs_triton(x):
        return forward_triton(x, stages, guess, channels, basis, groups, num_active, soft_clamp_mode, channels_last,
                              w_out, b_out)
    check_projections(groups, stages.shape[1], w_out, b_out)
    out, indices = _torch_forward(x, stages, channels, basis, groups, num_active, soft_clamp_mode)
    proj = _project_groups(out, w_out, b_out, groups)
    return proj, _in_layout(out, channels_last), indices


def _projected_backward(grad_proj, grad_out, x, out, w_out, b_out, stages, guess, channels, groups, num_active, kind,
                        soft_clamp_mode, channels_last):
    """Gradients of :func:`residual_quantize_projected` for ``(x, w_out, b_out)``: ``project_out``'s three products
    as ``nn.Linear``'s backward computes them (in the weights' dtype; cuBLAS on CUDA), then the straight-through
    kernel on ``d(out) = g W_out`` recomputed from ``x``."""
    b, gd, n = out.shape
    d, dim = gd // groups, w_out.shape[0] // groups
    g = grad_proj.reshape(b, n, groups, dim).to(w_out.dtype)
    w = w_out.reshape(groups, dim, d)
    grad_codes = torch.einsum("bngk,gkd->bngd", g, w).float()                        # b n g d
    grad_feature = rearrange_feature(grad_codes)
    if grad_out is not None:
        grad_feature = grad_feature + grad_out
    if torch.compiler.is_compiling() or not _runs_triton(x):
        grad_x = torch.ops.fsq_triton.residual_quantize_backward(grad_feature, x, stages, guess, channels, groups,
                                                                 num_active, kind, soft_clamp_mode, channels_last)
    else:
        grad_x = backward_triton(grad_feature, x, stages, guess, channels, groups, num_active, kind, soft_clamp_mode,
                                 channels_last)
    codes = out.to(w_out.dtype).reshape(b, groups, d, n)
    grad_w = torch.einsum("bngk,bgdn->gkd", g, codes).reshape(groups * dim, d)
    grad_b = g.sum((0, 1)).reshape(groups * dim) if b_out is not None else None
    return grad_x, grad_w, grad_b


def rearrange_feature(t: torch.Tensor) -> torch.Tensor:
    """``(b, n, g, d)`` -> the feature view ``(b, g*d, n)`` (a view of the same memory)."""
    b, n, g, d = t.shape
    return t.reshape(b, n, g * d).transpose(1, 2)


def _projected_setup_context(ctx, inputs, output):
    x, stages, guess, channels, _basis, w_out, b_out, groups, num_active, kind, soft_clamp_mode, channels_last = inputs
    ctx.save_for_backward(x, output[1], w_out, b_out, stages, guess, channels)
    ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
    ctx.mark_non_differentiable(output[2])


def _projected_grad(ctx, grad_proj, grad_out, _grad_indices):
    _refuse_double_backward()
    x, out, w_out, b_out, stages, guess, channels = ctx.saved_tensors
    grad_x, grad_w, grad_b = _projected_backward(grad_proj, grad_out, x, out, w_out, b_out, stages, guess, channels,
                                                 *ctx.config)
    return grad_x, None, None, None, None, grad_w, grad_b, None, None, None, None, None


residual_quantize_projected.register_autograd(_projected_grad, setup_context=_projected_setup_context)


class ResidualProjectedFunction(torch.autograd.Function):
    """``(proj, out, indices) = ResidualProjectedFunction.apply(x, stages, guess, channels, basis, w_out, b_out,
    groups, num_active, kind, soft_clamp_mode, channels_last)``: :func:`residual_quantize_projected` with its
    gradient for ``x``, ``w_out`` and ``b_out``; eager CUDA calls launch the kernel directly (no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, x, stages, guess, channels, basis, w_out, b_out, groups, num_active, kind, soft_clamp_mode,
                channels_last):
        if torch.compiler.is_compiling() or not _runs_triton(x):
            proj, out, indices = torch.ops.fsq_triton.residual_quantize_projected(
                x, stages, guess, channels, basis, w_out, b_out, groups, num_active, kind, soft_clamp_mode,
                channels_last)
        else:
            proj, out, indices = forward_triton(x, stages, guess, channels, basis, groups, num_active,
                                                soft_clamp_mode, channels_last, w_out, b_out)
        ctx.save_for_backward(x, out, w_out, b_out, stages, guess, channels)
        ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
        ctx.mark_non_differentiable(indices)
        return proj, out, indices

    @staticmethod
    def backward(ctx, grad_proj, grad_out, _grad_indices):
        return _projected_grad(ctx, grad_proj, grad_out, _grad_indices)


# --------------------------------------------------------------------------------------------------
# project_in and project_out fused (fsq_triton::residual_quantize_project_in_out), opt-in
# --------------------------------------------------------------------------------------------------


def _project_in_groups(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, groups: int) -> torch.Tensor:
    """``project_in`` of each group in torch ops (the op's CPU implementation): x (b, g * dim, n) -> h (b, g*d, n)
    float32, ``x`` cast to the weights' dtype, float32 accumulation, one rounding to the weights' dtype."""
    b, gk, n = x.shape
    d, dim = w_in.shape[0] // groups, gk // groups
    xs = x.to(w_in.dtype).float().reshape(b, groups, dim, n)
    h = torch.einsum("bgkn,gdk->bgdn", xs, w_in.float().reshape(groups, d, dim))
    if b_in is not None:
        h = h + b_in.float().reshape(groups, d)[None, :, :, None]
    return h.to(w_in.dtype).float().reshape(b, groups * d, n)


@torch.library.triton_op("fsq_triton::residual_quantize_project_in_out", mutates_args=())
def residual_quantize_project_in_out(
    x: torch.Tensor, stages: torch.Tensor, guess: torch.Tensor, channels: torch.Tensor, basis: torch.Tensor,
    w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None, groups: int,
    num_active: int, kind: int, soft_clamp_mode: int, channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`residual_quantize_projected` with ``project_in`` fused too: ``x`` is the module's input ``(b, g * dim,
    n)``; returns ``(proj (b, n, g * dim), h (b, g*d, n) float32, out (b, g*d, n) float32, indices (g, b, n, q))``."""
    if _runs_triton(x):
        return forward_triton(x, stages, guess, channels, basis, groups, num_active, soft_clamp_mode, channels_last,
                              w_out, b_out, w_in, b_in)
    check_projections(groups, stages.shape[1], w_out, b_out, w_in, b_in, x.shape[1])
    h = _project_in_groups(x, w_in, b_in, groups)
    out, indices = _torch_forward(h, stages, channels, basis, groups, num_active, soft_clamp_mode)
    proj = _project_groups(out, w_out, b_out, groups)
    return proj, _in_layout(h, channels_last), _in_layout(out, channels_last), indices


def _project_in_out_backward(grad_proj, grad_h, grad_out, x, h, out, w_in, b_in, w_out, b_out, stages, guess,
                             channels, groups, num_active, kind, soft_clamp_mode, channels_last):
    """Gradients for ``(x, w_in, b_in, w_out, b_out)``: :func:`_projected_backward` gives ``d(h)`` (the
    straight-through kernel recomputed from the saved ``h``), then ``project_in``'s products as ``nn.Linear``'s
    backward computes them, in the weights' dtype, ``d(x)`` cast back to ``x``'s dtype."""
    grad_h_kernel, grad_w_out, grad_b_out = _projected_backward(
        grad_proj, grad_out, h, out, w_out, b_out, stages, guess, channels, groups, num_active, kind, soft_clamp_mode,
        channels_last)
    if grad_h is not None:
        grad_h_kernel = grad_h_kernel + grad_h
    b, gk, n = x.shape
    d, dim = w_in.shape[0] // groups, gk // groups
    dh = grad_h_kernel.reshape(b, groups, d, n).to(w_in.dtype)
    w = w_in.reshape(groups, d, dim)
    grad_x = torch.einsum("bgdn,gdk->bgkn", dh, w).reshape(b, gk, n).to(x.dtype)
    xs = x.to(w_in.dtype).reshape(b, groups, dim, n)
    grad_w_in = torch.einsum("bgdn,bgkn->gdk", dh, xs).reshape(groups * d, dim)
    grad_b_in = dh.sum((0, 3)).reshape(groups * d) if b_in is not None else None
    return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out


def _project_in_out_setup_context(ctx, inputs, output):
    (x, stages, guess, channels, _basis, w_in, b_in, w_out, b_out, groups, num_active, kind, soft_clamp_mode,
     channels_last) = inputs
    ctx.save_for_backward(x, output[1], output[2], w_in, b_in, w_out, b_out, stages, guess, channels)
    ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
    ctx.mark_non_differentiable(output[3])


def _project_in_out_grad(ctx, grad_proj, grad_h, grad_out, _grad_indices):
    _refuse_double_backward()
    x, h, out, w_in, b_in, w_out, b_out, stages, guess, channels = ctx.saved_tensors
    grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out = _project_in_out_backward(
        grad_proj, grad_h, grad_out, x, h, out, w_in, b_in, w_out, b_out, stages, guess, channels, *ctx.config)
    return grad_x, None, None, None, None, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None, None, None


residual_quantize_project_in_out.register_autograd(_project_in_out_grad, setup_context=_project_in_out_setup_context)


class ResidualProjectInOutFunction(torch.autograd.Function):
    """``(proj, h, out, indices) = ResidualProjectInOutFunction.apply(x, stages, guess, channels, basis, w_in, b_in,
    w_out, b_out, groups, num_active, kind, soft_clamp_mode, channels_last)``: :func:`residual_quantize_project_in_out`
    with its gradient; eager CUDA calls launch the kernel directly."""

    @staticmethod
    def forward(ctx, x, stages, guess, channels, basis, w_in, b_in, w_out, b_out, groups, num_active, kind,
                soft_clamp_mode, channels_last):
        if torch.compiler.is_compiling() or not _runs_triton(x):
            proj, h, out, indices = torch.ops.fsq_triton.residual_quantize_project_in_out(
                x, stages, guess, channels, basis, w_in, b_in, w_out, b_out, groups, num_active, kind,
                soft_clamp_mode, channels_last)
        else:
            proj, h, out, indices = forward_triton(x, stages, guess, channels, basis, groups, num_active,
                                                   soft_clamp_mode, channels_last, w_out, b_out, w_in, b_in)
        ctx.save_for_backward(x, h, out, w_in, b_in, w_out, b_out, stages, guess, channels)
        ctx.config = (groups, num_active, kind, soft_clamp_mode, channels_last)
        ctx.mark_non_differentiable(indices)
        return proj, h, out, indices

    @staticmethod
    def backward(ctx, grad_proj, grad_h, grad_out, _grad_indices):
        return _project_in_out_grad(ctx, grad_proj, grad_h, grad_out, _grad_indices)
