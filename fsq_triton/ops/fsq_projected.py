"""FSQ behind projections, fused: ``project_in``, quantize and ``project_out`` in one pass per token tile.

Most FSQ layers sit behind projections: ``dim`` (512 to 1024) features go down to ``e = c * d``
(4 to 16) codebook channels and back up. Unfused, that is two skinny matrix products with the
quantizer's launches between them, and the ``(n, e)`` intermediates round-trip through memory.
Here one program owns ``BLOCK_N`` tokens: it reads their ``x`` once (through its strides,
channel-first or channel-last), computes ``h = x W_in^T + b_in`` with ``tl.dot`` (``e`` padded to
``E_PAD >= 16``), quantizes ``h`` in registers with the calibrated thresholds (as
``fsq_triton.ops.fsq``), reduces the indices (stores them, and with ``track_usage`` counts them into the
usage histogram), and writes ``out = codes W_out^T + b_out`` once.

(Under the Triton interpreter, whose ``tl.dot`` mishandles bfloat16, ``DOT_IN_F32`` upcasts the operands:
exact, since products of half-precision values are exact in float32.)

Numerics follow ``nn.Linear`` around the quantizer: products accumulate in float32 (IEEE float32
products for float32 weights, no TF32), ``h`` is rounded to the weights' dtype as ``nn.Linear``'s output
would be, the quantizer works in float32, and the codes are cast to the weights' dtype before
``project_out``.

The backward uses cuBLAS for the four small products (``g W_out``, ``g^T codes``, ``dh W_in``,
``dh^T x``) around the fused straight-through kernel (``fsq_triton::quantize_backward``) on the saved
``h`` (``e`` floats per token, 1/64 to 1/256 of ``x``): there the work is matrix products that cuBLAS
already runs at the bandwidth bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import levels as _lv
from .. import torch_impl
from .fsq import (
    check_rotation,
    COL_BASIS,
    COL_NUM_LEVELS,
    COL_THRESHOLDS,
    INT_COLS,
    _configured_launch,
    _empty_feature,
    _index_tensor,
    _indices_or_empty,
    _launch,
    _needs_int64,
    _runs_triton,
    _token_axes,
    cast_rne,
    cdiv,
    code_of_level,
    count_usage,
    quantize_levels,
    tile_origin,
    interpreting,
    next_pow2,
)


@triton.jit
def dot_accumulate(x, w, acc, IEEE_DOT: tl.constexpr, DOT_IN_F32: tl.constexpr):
    """``acc + x @ w`` in float32: IEEE float32 products for float32 operands (``IEEE_DOT``: no TF32); under the
    interpreter (``DOT_IN_F32``) the operands upcast first, exact since products of half-precision values are exact in
    float32."""
    if DOT_IN_F32:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    if IEEE_DOT:
        return tl.dot(x, w, acc, input_precision="ieee")
    else:
        return tl.dot(x, w, acc)


@triton.jit
def _project_out_store(
    codes, w_out_ptr, b_out_ptr, out_row, nn, n_ok, ee, e_ok, DIM: tl.constexpr, stride_oc, stride_on,
    E: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, DOT_IN_F32: tl.constexpr,
    OFFSET_64: tl.constexpr, HAS_B_OUT: tl.constexpr,
):
    """out[n, k] = sum_e codes[n, e] * W_out[k, e] (+ b_out[k] with ``HAS_B_OUT``), written chunk by chunk of
    ``BLOCK_K`` features."""
    codes = cast_rne(codes, w_out_ptr.dtype.element_ty)
    if DOT_IN_F32:  # exact: products of half-precision values are exact in float32
        codes = codes.to(tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < DIM
        w = tl.load(w_out_ptr + kk[None, :] * E + ee[:, None], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_IN_F32:
            w = w.to(tl.float32)
        if IEEE_DOT:
            o = tl.dot(codes, w, input_precision="ieee")
        else:
            o = tl.dot(codes, w)
        if HAS_B_OUT:  # no bias (projection_has_bias=False): nothing read
            o += tl.load(b_out_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if OFFSET_64:
            kk = kk.to(tl.int64)
        tl.store(out_row + kk[None, :] * stride_oc + nn[:, None] * stride_on,
                 cast_rne(o, out_row.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def rotate_token_codebooks(t, rot_ptr, ee, e_ok, C: tl.constexpr, D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """vqp's orthogonal rotation on a ``(tokens, E_PAD)`` tile whose channel ``e = c * D + j`` is channel ``j`` of
    codebook ``c`` (``ee``, ``e_ok``: the channel ids and their mask): per token and codebook ``t_c @ R``
    (``TRANSPOSED``: ``t_c @ R.T``), ``R (D, D)`` float32 row-major, in float32:

        out[:, c*D + j] = (((t[:, c*D] * R[0, j]) + t[:, c*D + 1] * R[1, j]) + ...) + t[:, c*D + D-1] * R[D-1, j]

    the order of :func:`fsq.rotate_codebooks` (mul, then add, in channel order: torch's CPU matmul of a
    ``(m, d) @ (d, d)`` product with ``d <= 8``, so the interpreter gives the unfused path's values bit for bit; on a
    GPU each step is one FMA), on this 2-d tile: the channels of a codebook need not be a power of two here, so they
    cannot be split into an axis of their own. Channel ``c*D + k`` is taken out by a sum of one nonzero term (exact)
    across the tile's channels, in whatever layout the dot left them (no conversion), and broadcast to the channels
    of its codebook. Padding channels come out 0."""
    jj = ee % D
    book = ee // D
    acc = tl.zeros(t.shape, dtype=tl.float32)
    for k in tl.static_range(D):
        if C == 1:
            t_k = tl.sum(tl.where((ee == k)[None, :], t, 0.0), axis=1)[:, None]
        else:
            t_k = tl.zeros(t.shape, dtype=tl.float32)
            for c in tl.static_range(C):
                column = tl.sum(tl.where((ee == c * D + k)[None, :], t, 0.0), axis=1)
                t_k = tl.where((book == c)[None, :], column[:, None], t_k)
        if TRANSPOSED:
            r = tl.load(rot_ptr + jj * D + k, mask=e_ok, other=0.0)  # R.T[k, j] = R[j, k]
        else:
            r = tl.load(rot_ptr + k * D + jj, mask=e_ok, other=0.0)  # R[k, j]
        acc = acc + t_k * r[None, :]
    return tl.where(e_ok[None, :], acc, 0.0)  # (an infinite t times a padding 0 would be NaN there)


@triton.jit
def _fsq_projected_forward_kernel(
    x_ptr, w_in_ptr, b_in_ptr, w_out_ptr, b_out_ptr,
    out_ptr, idx_ptr, h_ptr, val_ptr, int_ptr,
    N, num_n_blocks, DIM: tl.constexpr,
    stride_xb, stride_xc, stride_xn,
    stride_ob, stride_oc, stride_on,
    hist_ptr, hist_stride, rot_ptr,
    C: tl.constexpr, D: tl.constexpr, E_PAD: tl.constexpr, MAX_LEVEL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SAVE_H: tl.constexpr, IEEE_DOT: tl.constexpr, DOT_IN_F32: tl.constexpr, OFFSET_64: tl.constexpr,
    HAS_B_IN: tl.constexpr, HAS_B_OUT: tl.constexpr,
    WRITE_INDICES: tl.constexpr, TRACK_USAGE: tl.constexpr, COUNT_SPLIT: tl.constexpr, ROTATE: tl.constexpr,
):
    """project_in -> FSQ -> project_out for ``BLOCK_N`` tokens of one batch row (the default launch:
    ``WRITE_INDICES``, no ``TRACK_USAGE``, no ``ROTATE``; ``hist_ptr``, ``hist_stride`` and ``rot_ptr``, the last
    runtime arguments so that the others keep their parameter offsets, are then unused: the same machine code as
    without them).

    Math, per token (``x`` a row of ``dim`` features, ``e = c * d``):
        h     = round_to_weight_dtype(x W_in^T + b_in)                     (e,)
        level = #{k : h_j >= thr[j % d, k]},  code_j = codes[j % d, level]  (the calibrated FSQ, float32)
        index_c = sum_{j in codebook c} level_j * basis[j % d]  (-1 if any h_j of the codebook is NaN)
        ``WRITE_INDICES``: indices[token, c] = index_c    (otherwise not stored; with neither flag, not reduced)
        ``TRACK_USAGE``:   hist[c, index_c] += 1 (int64, relaxed atomic, :func:`fsq.count_usage`), for every
                           in-range token whose codebook channels are all non-NaN (a NaN token counts nowhere)
        out   = code W_out^T + b_out                                        (dim,)
    ``ROTATE`` (vqp's orthogonal rotation, ``R (d, d)`` float32 at ``rot_ptr``): per codebook ``y_c = h_c @ R``
    (:func:`rotate_token_codebooks`, float32) is what the thresholds count and the index is made of (a NaN in ``h_c``
    makes all of ``y_c`` NaN: index -1, NaN codes), and ``code_c @ R.T`` goes to ``project_out``; the saved ``h`` is
    ``h`` (before the rotation), from which the backward recomputes ``y``. No memory traffic (``R`` stays in cache).
    Memory traffic per token: read ``dim`` elements of ``x``, write ``dim`` of ``out`` (2 B each in
    bfloat16, 4 B in float32), and ``4 e`` B of ``h`` when saved for the backward; the weights
    (``2 * dim * e`` elements) are read by every program from L2. Without a bias (``HAS_B_IN``/``HAS_B_OUT``
    False, vqp's ``projection_has_bias=False``) the term is dropped and nothing is read. Per flag:
        ``WRITE_INDICES``: + 4 B of int32 index written per codebook (False: none);
        ``TRACK_USAGE``:   + one 8 B int64 atomic add per codebook (a read-modify-write of one histogram entry,
                           done in L2: the histogram, 8 B x codebook_size <= 8 MiB per codebook, is touched by
                           atomics only, never streamed or zeroed by this kernel; tokens of one code contend for
                           its entry, as ``index_add_``'s atomics would): next to the ``2 * dim`` elements a token
                           moves anyway, 0.8% more bytes per codebook at ``dim`` 256 in bfloat16.
    """
    b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
    E: tl.constexpr = C * D
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1

    nn = n_start + tl.arange(0, BLOCK_N)
    ee = tl.arange(0, E_PAD)
    n_ok = nn < N
    e_ok = ee < E
    tile_ok = n_ok[:, None] & e_ok[None, :]

    # project_in: h = x W_in^T + b_in, float32 accumulation over chunks of BLOCK_K features
    x_row = x_ptr + b * stride_xb
    acc = tl.zeros((BLOCK_N, E_PAD), dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < DIM
        w = tl.load(w_in_ptr + ee[None, :] * DIM + kk[:, None], mask=e_ok[None, :] & k_ok[:, None], other=0.0)
        if OFFSET_64:
            kk = kk.to(tl.int64)
        x = tl.load(x_row + kk[None, :] * stride_xc + nn[:, None] * stride_xn, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot_accumulate(x, w, acc, IEEE_DOT, DOT_IN_F32)
    h = acc
    if HAS_B_IN:
        h = acc + tl.load(b_in_ptr + ee, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    h = cast_rne(h, w_in_ptr.dtype.element_ty).to(tl.float32)

    # FSQ on h (ROTATE: on y = h_c @ R per codebook): count the calibrated thresholds (NaN padding never counts),
    # look the code up
    jj = ee % D
    values = val_ptr + jj * ROW
    y = h
    if ROTATE:
        y = rotate_token_codebooks(h, rot_ptr, ee, e_ok, C, D, False)
    level, code = quantize_levels(y, values[None, :], e_ok[None, :], MAX_LEVEL)
    is_nan = y != y
    code = tl.where(is_nan, y, code)
    if SAVE_H:  # h itself (ROTATE: before the rotation)
        tl.store(h_ptr + ((b * N + nn)[:, None] * E + ee[None, :]), h, mask=tile_ok)

    # one index per codebook: stored (WRITE_INDICES) and/or counted into the histogram (TRACK_USAGE)
    if WRITE_INDICES or TRACK_USAGE:
        basis = tl.load(int_ptr + jj * INT_COLS + COL_BASIS, mask=e_ok, other=0)
        contrib = level * basis[None, :]
        book = ee // D
        if OFFSET_64 and TRACK_USAGE:
            hist_stride = hist_stride.to(tl.int64)
        for c in tl.static_range(C):
            in_book = ((book == c) & e_ok)[None, :]
            index = tl.sum(tl.where(in_book, contrib, 0), axis=1)
            book_nan = tl.max(tl.where(in_book & is_nan, 1, 0), axis=1) > 0
            index = tl.where(book_nan, -1, index)
            if WRITE_INDICES:
                tl.store(idx_ptr + ((b * N + nn) * C + c), index, mask=n_ok)
            if TRACK_USAGE:  # the mask from the index (-1: a NaN token), not from book_nan: the compiler would
                # carry both tensors to the atomic's layout (sm_90: 4 more barriers on triton 3.9)
                count_usage(hist_ptr + c * hist_stride, index, (n_ok & (index >= 0)).to(tl.int8), COUNT_SPLIT)

    if ROTATE:  # code_c @ R.T per codebook, in float32, before the cast to the weights' dtype
        code = rotate_token_codebooks(code, rot_ptr, ee, e_ok, C, D, True)
    _project_out_store(code, w_out_ptr, b_out_ptr, out_ptr + b * stride_ob, nn, n_ok, ee, e_ok, DIM,
                       stride_oc, stride_on, E, BLOCK_K, IEEE_DOT, DOT_IN_F32, OFFSET_64, HAS_B_OUT)


@triton.jit
def _fsq_projected_decode_kernel(
    idx_ptr, w_out_ptr, b_out_ptr, out_ptr, val_ptr, int_ptr,
    N, num_n_blocks, DIM: tl.constexpr, codebook_size,
    stride_ob, stride_oc, stride_on, rot_ptr,
    C: tl.constexpr, D: tl.constexpr, E_PAD: tl.constexpr, MAX_LEVEL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, DOT_IN_F32: tl.constexpr,
    OFFSET_64: tl.constexpr, HAS_B_OUT: tl.constexpr, ROTATE: tl.constexpr,
):
    """Decode with ``project_out`` fused: token indices ``(b, n, c)`` -> features ``(b, dim, n)``.

    Math, per token: ``level_j = (index_{j // d} // basis[j % d]) % L[j % d]``, ``code_j = codes[j % d, level_j]``
    (NaN for an index outside ``[0, prod(levels))``), ``out = code W_out^T + b_out``; with ``ROTATE`` (vqp's
    orthogonal rotation, ``R`` at ``rot_ptr``, the last runtime argument: unused otherwise) ``code_c @ R.T`` per
    codebook in float32 (summed as :func:`rotate_token_codebooks` does) before the cast to the weights' dtype, as the
    forward.
    Memory traffic per token: read ``4 c`` B of indices, write ``dim`` elements (the weights' dtype).
    """
    b, n_start = tile_origin(num_n_blocks, BLOCK_N, OFFSET_64)
    E: tl.constexpr = C * D
    ROW: tl.constexpr = COL_THRESHOLDS + 2 * MAX_LEVEL - 1

    nn = n_start + tl.arange(0, BLOCK_N)
    ee = tl.arange(0, E_PAD)
    n_ok = nn < N
    e_ok = ee < E
    tile_ok = n_ok[:, None] & e_ok[None, :]
    jj = ee % D

    index = tl.load(idx_ptr + ((b * N + nn)[:, None] * C + (ee // D)[None, :]), mask=tile_ok, other=0)
    valid = (index >= 0) & (index < codebook_size)
    index = tl.where(valid, index, 0)
    if ROTATE:
        # code_c @ R.T in the order of rotate_token_codebooks (mul, then add, channel by channel), with channel k of
        # each element's codebook decoded again from the codebook's index, which every element of the tile holds:
        # no sums across the channels (sm_90, triton 3.6: those took 23 more barriers)
        code = tl.zeros((BLOCK_N, E_PAD), dtype=tl.float32)
        for k in tl.static_range(D):
            basis_k = tl.load(int_ptr + k * INT_COLS + COL_BASIS)
            level_k = (index // basis_k) % tl.load(int_ptr + k * INT_COLS + COL_NUM_LEVELS)
            code_k = code_of_level(level_k, val_ptr + k * ROW, None, MAX_LEVEL)
            code = code + code_k * tl.load(rot_ptr + jj * D + k, mask=e_ok, other=0.0)[None, :]  # R.T[k, j] = R[j, k]
        code = tl.where(valid | ~tile_ok, code, float("nan"))
    else:
        basis = tl.load(int_ptr + jj * INT_COLS + COL_BASIS, mask=e_ok, other=1)
        nlev = tl.load(int_ptr + jj * INT_COLS + COL_NUM_LEVELS, mask=e_ok, other=1)
        level = (index // basis[None, :]) % nlev[None, :]
        code = code_of_level(level, (val_ptr + jj * ROW)[None, :], e_ok[None, :], MAX_LEVEL)
        code = tl.where(valid | ~tile_ok, code, float("nan"))

    _project_out_store(code, w_out_ptr, b_out_ptr, out_ptr + b * stride_ob, nn, n_ok, ee, e_ok, DIM,
                       stride_oc, stride_on, E, BLOCK_K, IEEE_DOT, DOT_IN_F32, OFFSET_64, HAS_B_OUT)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


# COUNT_SPLIT of a projected forward that counts usage (see fsq.count_usage, fsq.count_split): 1. The index is a
# reduction across the channels of the dot's (tokens, e) accumulator tile, and its atomics take that layout as it is:
# halving it as the plain kernel's rows do costs conversions here (sm_90, dim 1024, one codebook: 2 tokens a part
# added 4 barriers in bfloat16 and 8 in float32, on triton 3.6 and 3.9; 1 adds none: bench/inspect_kernels.py).
PROJECTED_COUNT_SPLIT = 1


def _e_pad(e: int) -> int:
    return max(16, next_pow2(e))  # tl.dot needs every dimension >= 16


def _block_k(dim: int) -> int:
    return max(16, min(64, next_pow2(dim)))


def forward_projected_triton(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks: int,
                             channels_last: bool, save_h: bool, write_indices: bool = True,
                             usage: torch.Tensor | None = None, rotation: torch.Tensor | None = None):
    """x (b, dim, n) in the weights' dtype -> out (b, dim, n), indices (b, n, c) int32, h (b, n, e) float32 or (0,).

    ``write_indices=False``: no index is stored, and ``indices`` is an empty ``(0,)`` int32 tensor. ``usage``: a
    ``(c, codebook_size)`` int64 contiguous histogram on x's device, to which the kernel adds each counted token's
    code (in place, no host sync; see :func:`fsq.forward_triton`). ``rotation``: vqp's orthogonal rotation
    ``R (d, d)``, float32 contiguous on x's device: the kernel quantizes ``h_c @ R`` and projects ``code_c @ R.T``
    (``ROTATE``); ``h`` is still the unrotated projection.
    """
    b, dim, n = x.shape
    d, max_level = integers.shape[0], _lv.max_level_of(values)
    e = num_codebooks * d
    if rotation is not None:
        check_rotation(rotation, d, x.device)
    out = _empty_feature(x.shape, x.device, channels_last, x.dtype)
    if write_indices:
        indices = torch.empty((b, n, num_codebooks), dtype=torch.int32, device=x.device)
    else:
        indices = torch.empty((0,), dtype=torch.int32, device=x.device)  # a pointer the kernel never touches
    h = torch.empty((b, n, e) if save_h else (0,), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, indices, h
    rows, tokens, (sx, so) = _token_axes(x, out)
    e_pad, block_k = _e_pad(e), _block_k(dim)
    offset_64 = _needs_int64(x, out, indices, *(() if usage is None else (usage,)))

    def launch(cfg):
        block_n = max(16, min(cfg["BLOCK_N"], 256))  # a (BLOCK_N, BLOCK_K) tile of x per step
        nblocks = cdiv(tokens, block_n)
        hist = indices if usage is None else usage  # (unused without TRACK_USAGE)
        _launch(_fsq_projected_forward_kernel, x)[(rows * nblocks,)](
            x, w_in, b_in, w_out, b_out, out, indices, h, values, integers,
            tokens, nblocks, dim, *sx, *so, hist, hist.shape[-1] if usage is not None else 0,
            values if rotation is None else rotation,
            C=num_codebooks, D=d, E_PAD=e_pad, MAX_LEVEL=max_level,
            BLOCK_N=block_n, BLOCK_K=block_k, SAVE_H=save_h, IEEE_DOT=x.dtype == torch.float32,
            DOT_IN_F32=interpreting(), OFFSET_64=offset_64, HAS_B_IN=b_in.numel() > 0, HAS_B_OUT=b_out.numel() > 0,
            WRITE_INDICES=write_indices, TRACK_USAGE=usage is not None, COUNT_SPLIT=PROJECTED_COUNT_SPLIT,
            ROTATE=rotation is not None, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
        )

    _configured_launch("projected_forward", x, rows * tokens, block_k, x.dtype, channels_last, launch)
    return out, indices, h


def decode_projected_triton(indices, w_out, b_out, values, integers, codebook_size: int, channels_last: bool,
                            rotation: torch.Tensor | None = None):
    """indices (b, n, c) -> out (b, dim, n) in the weights' dtype; ``rotation``: vqp's ``R (d, d)`` (float32,
    contiguous, on the indices' device), the codes then being ``code_c @ R.T`` before ``project_out``."""
    b, n, c = indices.shape
    dim = w_out.shape[0]
    d, max_level = integers.shape[0], _lv.max_level_of(values)
    if rotation is not None:
        check_rotation(rotation, d, indices.device)
    out = _empty_feature((b, dim, n), indices.device, channels_last, w_out.dtype)
    if out.numel() == 0:
        return out
    indices = _index_tensor(indices)
    rows, tokens, (so,) = _token_axes(out)
    e_pad, block_k = _e_pad(c * d), _block_k(dim)
    offset_64 = _needs_int64(indices, out)

    def launch(cfg):
        block_n = max(16, min(cfg["BLOCK_N"], 256))
        nblocks = cdiv(tokens, block_n)
        _launch(_fsq_projected_decode_kernel, out)[(rows * nblocks,)](
            indices, w_out, b_out, out, values, integers,
            tokens, nblocks, dim, codebook_size, *so, values if rotation is None else rotation,
            C=c, D=d, E_PAD=e_pad, MAX_LEVEL=max_level,
            BLOCK_N=block_n, BLOCK_K=block_k, IEEE_DOT=w_out.dtype == torch.float32,
            DOT_IN_F32=interpreting(), OFFSET_64=offset_64, HAS_B_OUT=b_out.numel() > 0, ROTATE=rotation is not None,
            num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
        )

    _configured_launch("projected_decode", out, rows * tokens, block_k, w_out.dtype, channels_last, launch)
    return out


# --------------------------------------------------------------------------------------------------
# Custom ops: fsq_triton::quantize_projected (and quantize_projected_counted), fsq_triton::indices_to_codes_projected
# --------------------------------------------------------------------------------------------------


def _tokens(feature: torch.Tensor) -> torch.Tensor:
    """(b, k, n) feature view -> (b, n, k) token rows (a view)."""
    return feature.transpose(1, 2)


def bias_or_none(bias: torch.Tensor) -> torch.Tensor | None:
    """The ops take an empty tensor for "no bias" (a projection without one): None for ``F.linear``."""
    return bias if bias.numel() > 0 else None


@torch.library.triton_op("fsq_triton::quantize_projected", mutates_args=())
def quantize_projected(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
    values: torch.Tensor, integers: torch.Tensor, num_codebooks: int, channels_last: bool, save_h: bool,
    write_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused project_in -> FSQ -> project_out on ``x (b, dim, n)`` (the weights' dtype).

    Returns ``out (b, dim, n)``, ``indices (b, n, c)`` int32 (``write_indices=False``: an empty ``(0,)`` int32
    tensor, none reduced or stored) and, with ``save_h``, ``h (b, n, e)`` float32 (the projected input, for the
    backward; an empty tensor otherwise).
    """
    if _runs_triton(x):
        return forward_projected_triton(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks, channels_last,
                                        save_h, write_indices)
    out, indices, saved = _quantize_projected_by_tables(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks,
                                                        channels_last, save_h)
    return out, _indices_or_empty(indices, write_indices), saved


@torch.library.triton_op("fsq_triton::quantize_projected_counted", mutates_args=("usage",))
def quantize_projected_counted(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
    values: torch.Tensor, integers: torch.Tensor, num_codebooks: int, channels_last: bool, save_h: bool,
    write_indices: bool, usage: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_projected` that also adds each token's code to ``usage (c, codebook_size)`` int64, in place,
    in the same kernel (a NaN token counts nowhere; with or without ``write_indices``). A mutating op has no
    registered autograd: the module reaches it through ``FSQProjectedFunction``, whose backward is the same."""
    if _runs_triton(x):
        return forward_projected_triton(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks, channels_last,
                                        save_h, write_indices, usage)
    out, indices, saved = _quantize_projected_by_tables(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks,
                                                        channels_last, save_h)
    flat = indices.reshape(-1, num_codebooks)
    slot = flat.clamp(min=0).to(torch.int64) + torch.arange(num_codebooks, device=flat.device) * usage.shape[-1]
    usage.view(-1).index_add_(0, slot.reshape(-1), (flat >= 0).reshape(-1).to(usage.dtype))
    return out, _indices_or_empty(indices, write_indices), saved


def _quantize_projected_by_tables(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks: int,
                                  channels_last: bool, save_h: bool):
    """The ops' torch path (CPU without the interpreter, and shape propagation): ``nn.Linear``, the kernels' table
    math (``torch_impl.quantize_by_tables``), ``nn.Linear``; ``(out, indices (b, n, c), h or (0,))``."""
    h = F.linear(_tokens(x), w_in, bias_or_none(b_in))                     # (b, n, e), the weights' dtype
    codes, indices = torch_impl.quantize_by_tables(_tokens(h), values, integers, num_codebooks)
    out = F.linear(_tokens(codes), w_out, bias_or_none(b_out))               # (b, n, dim)
    out_feature = _empty_feature(x.shape, x.device, channels_last, x.dtype).copy_(_tokens(out))
    saved = h.float() if save_h else torch.empty((0,), dtype=torch.float32, device=x.device)
    return out_feature, indices, saved


@torch.library.triton_op("fsq_triton::indices_to_codes_projected", mutates_args=())
def indices_to_codes_projected(
    indices: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, values: torch.Tensor, integers: torch.Tensor,
    codebook_size: int, channels_last: bool,
) -> torch.Tensor:
    """Decode ``indices (b, n, c)`` and ``project_out`` in one pass -> ``(b, dim, n)`` in the weights' dtype."""
    if _runs_triton(indices):
        return decode_projected_triton(indices, w_out, b_out, values, integers, codebook_size, channels_last)
    codes = torch_impl.indices_to_codes_by_tables(indices, values, integers, codebook_size, w_out.dtype)
    out = F.linear(_tokens(codes), w_out, bias_or_none(b_out))
    b, n, _ = indices.shape
    return _empty_feature((b, w_out.shape[0], n), indices.device, channels_last, w_out.dtype).copy_(_tokens(out))


# (Their registered autograd, and the autograd.Function the module calls, are in ``autograd.py``.)
