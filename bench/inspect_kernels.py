"""Compile every kernel for a GPU architecture without a GPU, and read the machine code: ``python bench/inspect_kernels.py``.

Triton compiles ahead of time for a target (``GPUTarget("cuda", 90, 32)`` is Hopper: H100, H200) with the
``ptxas`` and ``cuobjdump`` its wheel ships, so the real compiler's verdict (which the CPU interpreter never
gives) is available on any machine, for whichever triton is installed (the GPU machines run triton 3.6, CI
3.9: run it under both). For each kernel variant it reports:

- ``registers``, ``spill_bytes`` (spill stores + spill loads): from the ``ptxas -v`` report of Triton's own
  ptxas run (its ptxas and options differ between versions; cuobjdump's LOCAL column misses spills);
- ``shared_bytes``: the shared memory Triton allocates for the kernel (``metadata.shared``: layout
  conversions through shared memory show up here, not in the cubin's static figure);
- ``barriers``: ``BAR`` instructions in the SASS (each one a block-wide sync);
- ``ldg128``, ``stg128``: 128-bit global loads and stores (``LDG.E.128``/``STG.E.128``), i.e. coalesced
  vector accesses; ``wide_loads_before_store``: 64- and 128-bit loads issued before the first store (how many rows
  of a tile are in flight before the first result is written); ``mma``: tensor-core instructions
  (``HGMMA``/``HMMA``) in the fused projections;
- ``blocks_per_sm``: resident blocks per SM that the registers and shared memory allow (Hopper: 64K
  registers and 228 KB shared memory per SM, at most 64 warps);
- ``instructions``: SASS instructions in the kernel (every path, as compiled; the residual rows and the streaming
  forward rows divide it by their ``values_per_thread``: instructions an element);
- ``fma_contracted`` (kernels that must match the reference bit for bit: the streaming forward and decode, the
  residual forwards without projections): FFMAs the compiler formed itself from a multiply and an add, i.e. the
  FFMAs the kernel loses when compiled again with ``enable_fp_fusion=False`` (explicit ``tl.fma`` stays);
  ``ptx_mul_rn``, ``ptx_div_rn``: ``mul.rn``/``div.rn`` in the PTX (rounded alone, never fused).

The variants are what the launchers produce for the common cases (strides specialised as Triton does at
launch: a stride of 1 becomes a constant, values divisible by 16 are marked so): the streaming kernels
(forward, backward, decode) in float32, bfloat16 and float16, channel-first (token stride 1) and channel-last
(channel stride 1, token strides marked divisible by 16: c*d a multiple of 16), the float32 channel-last ones
again with a token stride of 8 (8 channels, not divisible by 16), the forward's flag kernel (no indices, usage
counted in the kernel, or noise dropout drawn in it) in float32 and bfloat16 and both layouts, plus the 64-bit-offset forward with large levels
and the fused projections (forward and decode: the default launches, and with usage counted or the orthogonal
rotation in them).

``--json`` prints one JSON object per line, one per kernel. Run it with the interpreter off (its kernels
cannot be compiled); ``tests/test_sm90_compile.py`` asserts the goals on this output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Triton prints its ptxas -v report with TRITON_DUMP_PTXAS_LOG, and only when it really compiles (no cache hit).
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fsq_triton.ops.fsq as F  # noqa: E402
from fsq_triton import autotune  # noqa: E402
import fsq_triton.ops.fsq_projected as P  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
MAX_WARPS_PER_SM = 64


@dataclass
class Variant:
    name: str
    kernel: object
    types: dict                  # runtime argument -> Triton type string
    constexprs: dict             # argument -> value (specialised strides included)
    divisible_by_16: tuple = ()  # runtime arguments Triton would mark divisible by 16
    num_warps: int = 8
    num_stages: int = 3
    tags: dict = field(default_factory=dict)


def _ints(*names):
    return {n: "i32" for n in names}


def _streaming(dt: str, layout: str) -> list[Variant]:
    """forward, backward and decode of levels [8, 8, 8, 5, 5, 5, 5, 5] (8 channels, one codebook) in ``layout``."""
    cf = layout == "channel-first"
    # channel-first: token stride 1; channel-last contiguous: channel stride 1, the batch folded into the tokens
    tok = {"n": 1} if cf else {"c": 1}
    tags = {"kind": "", "dtype": dt, "layout": layout}
    size = 4 if dt == "fp32" else 2

    def default(kernel):  # fsq_triton.autotune's default configuration for 8 channels and many tokens
        return autotune.default_config(8, 1 << 24, kernel=kernel, element_size=size, channels_last=not cf)

    def strides(prefix, names):
        specialised = {f"stride_{prefix}{k}": v for k, v in tok.items()}
        runtime = [f"stride_{prefix}{a}" for a in names if f"stride_{prefix}{a}" not in specialised]
        return specialised, runtime

    out = []
    sz, rz = strides("z", "bcn")
    so, ro = strides("o", "bcn")
    out.append(Variant(
        f"forward {dt} {layout}", F._fsq_forward_kernel,
        {"z_ptr": "*" + dt, "out_ptr": "*" + dt, "idx_ptr": "*i32", "val_ptr": "*fp32", "int_ptr": "*i32",
         **DEFAULT_FORWARD_EXTRAS, **_ints("N", "num_n_blocks", *rz, *ro)},
        dict(**sz, **so, C=1, D=8, C_PAD=1, D_PAD=8, MAX_LEVEL=8, BLOCK_N=default("forward")["BLOCK_N"], CHANNEL_ROWS=cf,
             OFFSET_64=False, DENSE=not cf, **DEFAULT_FORWARD_FLAGS,
             **F.row_plan(8, not cf, size, default("forward")["BLOCK_N"], default("forward")["num_warps"])),
        ("z_ptr", "out_ptr", "idx_ptr", "val_ptr", "int_ptr", "N", *rz, *ro, *DEFAULT_FORWARD_ALIGNED),
        default("forward")["num_warps"],
        tags={**tags, "kind": "forward", "bitwise": True,
              "values_per_thread": default("forward")["BLOCK_N"] * 8 // (32 * default("forward")["num_warps"])},
    ))
    sg, rg = strides("g", "bcn")
    sd, rd = strides("d", "bcn")
    out.append(Variant(
        f"backward {dt} {layout}", F._fsq_backward_kernel,
        {"g_ptr": "*" + dt, "z_ptr": "*" + dt, "dz_ptr": "*" + dt, "val_ptr": "*fp32", "rot_ptr": "*fp32",
         "noise_p": "fp32", **_ints("N", "num_n_blocks", "noise_seed", *rg, *rz, *rd)},
        dict(**sg, **sz, **sd, CD=8, D=8, CD_PAD=8, MAX_LEVEL=8, BLOCK_N=default("backward")["BLOCK_N"], OFFSET_64=False,
             DENSE=not cf, NOISE=False, ROTATE=False, C_PAD=1, D_PAD=1),
        ("g_ptr", "z_ptr", "dz_ptr", "val_ptr", "rot_ptr", "N", *rg, *rz, *rd), default("backward")["num_warps"],
        tags={**tags, "kind": "backward"},
    ))
    out.append(Variant(
        f"decode {dt} {layout}", F._fsq_decode_kernel,
        {"idx_ptr": "*i32", "out_ptr": "*" + dt, "val_ptr": "*fp32", "int_ptr": "*i32", "rot_ptr": "*fp32",
         **_ints("N", "num_n_blocks", "codebook_size", *ro)},
        dict(**so, C=1, D=8, C_PAD=1, D_PAD=8, MAX_LEVEL=8, BLOCK_N=default("decode")["BLOCK_N"], CHANNEL_ROWS=cf,
             GROUPS=max(1, 8 * (4 if dt == "fp32" else 2) // 16), OFFSET_64=False, DENSE=not cf, ROTATE=False),
        ("idx_ptr", "out_ptr", "val_ptr", "int_ptr", "rot_ptr", "N", *ro), default("decode")["num_warps"],
        tags={**tags, "kind": "decode", "bitwise": True},
    ))
    return out


def _rotated(v: Variant) -> Variant:
    """A backward or decode row of :func:`_streaming` with the orthogonal rotation, as the launchers run it."""
    size = 4 if v.tags["dtype"] == "fp32" else 2
    cf = v.tags["layout"] == "channel-first"
    cfg = {"BLOCK_N": v.constexprs["BLOCK_N"], "num_warps": v.num_warps}
    if v.tags["kind"] == "backward":
        cfg = F.rotation_config(cfg, 8, size, not cf)
        extra = dict(ROTATE=True, C_PAD=1, D_PAD=8)
    else:
        cfg = dict(cfg, BLOCK_N=F.capped_block_n(cfg["BLOCK_N"], cfg["num_warps"], 8))
        extra = dict(ROTATE=True, GROUPS=1)
    return dataclasses.replace(v, name=f"{v.name}, rotation", constexprs={**v.constexprs, **extra, "BLOCK_N": cfg["BLOCK_N"]},
                               num_warps=cfg["num_warps"],
                               tags={**v.tags, "kind": v.tags["kind"] + "-rotation", "bitwise": False})


# The forward kernel's default launch (forward_triton): the histogram pointer is the index tensor, its stride and the
# noise seed 0 (so marked divisible by 16), the noise probability 0.0, and the flags off.
DEFAULT_FORWARD_EXTRAS = {"hist_ptr": "*i32", "rot_ptr": "*fp32", "hist_stride": "i32", "noise_seed": "i32",
                          "noise_p": "fp32"}
DEFAULT_FORWARD_ALIGNED = ("hist_ptr", "rot_ptr", "hist_stride", "noise_seed")
DEFAULT_FORWARD_FLAGS = dict(WRITE_INDICES=True, TRACK_USAGE=False, COUNT_SPLIT=1, NOISE=False, ROTATE=False)


def _forward_flags(dt: str, layout: str, write_indices: bool, track_usage: bool, what: str, noise: bool = False,
                   rotate: bool = False) -> Variant:
    """``_fsq_forward_kernel`` with its flags, as ``forward_triton`` launches it for 8 channels, one codebook."""
    cf = layout == "channel-first"
    size = 4 if dt == "fp32" else 2
    cfg = autotune.default_config(8, 1 << 24, kernel="forward", element_size=size, channels_last=not cf)
    if rotate:  # forward_triton's tile for the rotation
        cfg = F.rotation_config(cfg, 8, size, not cf)
    elif noise:  # forward_triton's cap for noise dropout
        cfg = dict(cfg, BLOCK_N=F.capped_block_n(cfg["BLOCK_N"], cfg["num_warps"], 8))
    split = 1 if rotate else F.count_split(size, not cf, write_indices, 1, cfg["BLOCK_N"], cfg["num_warps"])
    tok = {"stride_zn": 1, "stride_on": 1} if cf else {"stride_zc": 1, "stride_oc": 1}
    runtime = [n for n in ("stride_zb", "stride_zc", "stride_zn", "stride_ob", "stride_oc", "stride_on") if n not in tok]
    return Variant(
        f"forward flags {dt} {layout}, {what}", F._fsq_forward_kernel,
        {"z_ptr": "*" + dt, "out_ptr": "*" + dt, "idx_ptr": "*i32", "hist_ptr": "*i64" if track_usage else "*i32",
         "val_ptr": "*fp32", "int_ptr": "*i32", "rot_ptr": "*fp32", "noise_p": "fp32",
         **_ints("N", "num_n_blocks", "hist_stride", "noise_seed", *runtime)},
        dict(**tok, C=1, D=8, C_PAD=1, D_PAD=8, MAX_LEVEL=8, BLOCK_N=cfg["BLOCK_N"], CHANNEL_ROWS=cf, OFFSET_64=False,
             WRITE_INDICES=write_indices, TRACK_USAGE=track_usage, COUNT_SPLIT=split if track_usage else 1,
             DENSE=not cf, NOISE=noise, ROTATE=rotate, **F.row_plan(8, not cf, size, cfg["BLOCK_N"], cfg["num_warps"])),
        ("z_ptr", "out_ptr", "idx_ptr", "hist_ptr", "val_ptr", "int_ptr", "rot_ptr", "N", *runtime,
         *(() if track_usage else ("hist_stride",)), *(() if noise else ("noise_seed",))), cfg["num_warps"],
        tags={"kind": "forward-rotation" if rotate else "forward-flags", "dtype": dt, "layout": layout},
    )


def _projected_forward(dt: str, track_usage: bool = False, write_indices: bool = True, rotate: bool = False,
                       num_codebooks: int = 1) -> Variant:
    """``_fsq_projected_forward_kernel`` as ``forward_projected_triton`` launches it: channel-last, dim 1024,
    codebooks of 4 channels (one unless ``num_codebooks``), ``h`` saved; the default launch (the histogram pointer is
    the index tensor, its stride 0, the rotation pointer the value table), or counting usage (``TRACK_USAGE``, the
    launcher's ``COUNT_SPLIT``), with or without the indices, or with the orthogonal rotation (``ROTATE``)."""
    what = ", usage counted" if track_usage else ""
    what += "" if write_indices else ", no indices"
    what += f", {num_codebooks} codebooks" if num_codebooks > 1 else ""
    what += ", rotation" if rotate else ""
    kind = "projected-usage" if track_usage else "projected-rotation" if rotate else "projected"
    return Variant(
        f"projected forward {dt} channel-last, dim 1024{what}", P._fsq_projected_forward_kernel,
        {"x_ptr": "*" + dt, "w_in_ptr": "*" + dt, "b_in_ptr": "*" + dt, "w_out_ptr": "*" + dt, "b_out_ptr": "*" + dt,
         "out_ptr": "*" + dt, "idx_ptr": "*i32", "h_ptr": "*fp32", "hist_ptr": "*i64" if track_usage else "*i32",
         "val_ptr": "*fp32", "int_ptr": "*i32", "rot_ptr": "*fp32",
         **_ints("N", "num_n_blocks", "hist_stride", "stride_xb", "stride_xn", "stride_ob", "stride_on")},
        dict(stride_xc=1, stride_oc=1, DIM=1024, C=num_codebooks, D=4, E_PAD=P._e_pad(4 * num_codebooks), MAX_LEVEL=8,
             BLOCK_N=128, BLOCK_K=64, SAVE_H=True, IEEE_DOT=dt == "fp32", DOT_IN_F32=False, OFFSET_64=False,
             HAS_B_IN=True, HAS_B_OUT=True, WRITE_INDICES=write_indices, TRACK_USAGE=track_usage,
             COUNT_SPLIT=P.PROJECTED_COUNT_SPLIT if track_usage else 1, ROTATE=rotate),
        ("x_ptr", "w_in_ptr", "w_out_ptr", "out_ptr", "idx_ptr", "h_ptr", "hist_ptr", "val_ptr", "int_ptr", "rot_ptr",
         "N", *(() if track_usage else ("hist_stride",)), "stride_xb", "stride_xn", "stride_ob", "stride_on"),
        num_warps=8, tags={"kind": kind, "dtype": dt},
    )


def variants() -> list[Variant]:
    out = []
    for dt in ("fp32", "bf16", "fp16"):
        for layout in ("channel-first", "channel-last"):
            out += _streaming(dt, layout)
    # The forward's flag kernel (issue 11): indices off (return_indices=False), or usage counted in the kernel
    # (track_usage), at the default configuration and with the launcher's COUNT_SPLIT.
    for dt in ("fp32", "bf16"):
        for layout in ("channel-first", "channel-last"):
            for write_indices, track_usage, what in ((False, False, "no indices"), (True, True, "usage counted")):
                out.append(_forward_flags(dt, layout, write_indices, track_usage, what))
            out.append(_forward_flags(dt, layout, True, False, "noise dropout", noise=True))
            out.append(_forward_flags(dt, layout, True, False, "rotation", rotate=True))
            out += [_rotated(v) for v in _streaming(dt, layout) if v.tags["kind"] in ("backward", "decode")]
    # The channel-last rows above mark the token strides divisible by 16, as Triton does at launch when c*d is a
    # multiple of 16. With 8 channels (token stride 8) Triton cannot mark them: these rows compile what such a launch
    # runs (a contiguous input: the backward and decode take the token stride as the constexpr DENSE asks for).
    for v in _streaming("fp32", "channel-last"):
        out.append(dataclasses.replace(
            v, name=f"{v.name}, token stride 8", tags={**v.tags, "kind": v.tags["kind"] + " token-stride-8"},
            divisible_by_16=tuple(n for n in v.divisible_by_16 if not re.fullmatch(r"stride_[a-z]n", n)),
        ))
    out.append(Variant(
        "forward fp32, 64-bit offsets, levels 100", F._fsq_forward_kernel,
        {"z_ptr": "*fp32", "out_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*fp32", "int_ptr": "*i32",
         **DEFAULT_FORWARD_EXTRAS,
         **_ints("N", "num_n_blocks", "stride_zb", "stride_zc", "stride_zn", "stride_ob", "stride_oc", "stride_on")},
        dict(C=2, D=3, C_PAD=2, D_PAD=4, MAX_LEVEL=100, BLOCK_N=512, CHANNEL_ROWS=True, OFFSET_64=True, DENSE=False,
             **DEFAULT_FORWARD_FLAGS, **F.row_plan(3, False, 4, 512, 8)),
        divisible_by_16=DEFAULT_FORWARD_ALIGNED, num_warps=8,
        tags={"kind": "forward-large-levels"},
    ))
    for dt in ("fp32", "bf16"):
        out.append(_projected_forward(dt))
    # ... and counting usage in the same pass (track_usage with fused projections), with and without indices
    for dt in ("fp32", "bf16"):
        out.append(_projected_forward(dt, track_usage=True))
    out.append(_projected_forward("bf16", track_usage=True, write_indices=False))
    # ... and with the orthogonal rotation in the same pass (h_c @ R quantized, code_c @ R.T projected out), one
    # codebook and two (against the default launch with two)
    for dt in ("fp32", "bf16"):
        out.append(_projected_forward(dt, rotate=True))
    out.append(_projected_forward("bf16", num_codebooks=2))
    out.append(_projected_forward("bf16", rotate=True, num_codebooks=2))
    for rotate in (False, True):  # the default launch (the rotation pointer is the value table), and ROTATE
        out.append(Variant(
            "projected decode bf16, 2 codebooks" + (", rotation" if rotate else ""), P._fsq_projected_decode_kernel,
            {"idx_ptr": "*i32", "w_out_ptr": "*bf16", "b_out_ptr": "*bf16", "out_ptr": "*bf16", "val_ptr": "*fp32",
             "int_ptr": "*i32", "rot_ptr": "*fp32", **_ints("N", "num_n_blocks", "codebook_size", "stride_ob", "stride_on")},
            dict(stride_oc=1, DIM=1024, C=2, D=4, E_PAD=16, MAX_LEVEL=8, BLOCK_N=128, BLOCK_K=64, IEEE_DOT=False,
                 DOT_IN_F32=False, OFFSET_64=False, HAS_B_OUT=True, ROTATE=rotate),
            ("idx_ptr", "w_out_ptr", "out_ptr", "val_ptr", "int_ptr", "rot_ptr", "N", "stride_ob", "stride_on"),
            num_warps=8, tags={"kind": "projected-rotation" if rotate else "projected", "dtype": "bf16"},
        ))
    out += _residual_variants()
    return out


def _residual_variants() -> list[Variant]:
    """The fused residual kernels as ``forward_triton``/``backward_triton`` launch them for ``ResidualFSQ`` with 8
    stages of levels [8, 5, 5, 5] (issue 12's case) on float32: channel-last ``(b, n, 4)`` (one row of tokens, batch
    strides 0, the token stride a runtime 4 the kernels never specialise, ``DENSE`` 16-byte channel tiles, 4-stage
    index rows) and channel-first ``(b, 4, n)`` (strided per channel), by guess and correction, and the compare chain
    that a configuration whose guess cannot be proven runs. ``values_per_thread`` gives instructions per value."""
    import fsq_triton.ops.residual as R

    block, warps = R._tile(1 << 22, 4)
    proj_block, proj_warps, proj_k = R._projected_tile(1 << 22, 1024)
    rows = 14  # residual_tables((8, 5, 5, 5), 8, "current", "sym_clamp", ...).guess.shape[2] - 1
    common = dict(G=1, D=4, Q=8, MAX_LEVEL=8, BLOCK_N=block, OFFSET_64=False, SOFT_CLAMP=0, GUESS_ROWS=rows)
    # the arguments of project_in (PROJECT_IN) that a launch without it leaves at their defaults (None: constexpr)
    no_project_in = dict(w_in_ptr=None, b_in_ptr=None, h_ptr=None, PROJECT_IN=False, HAS_B_IN=False, E_PAD=16,
                         BLOCK_KI=32, IEEE_DOT=False, DOT_IN_F32=False)
    forward_flags = dict(PROJECT_OUT=False, BLOCK_K=16, HAS_B_OUT=False, **no_project_in)
    tags = {"kind": "residual", "dtype": "fp32", "values_per_thread": block * 4 // (32 * warps)}
    # the default launch passes the stage table for the projection's pointers and 0 for its strides
    forward_types = {"x_ptr": "*fp32", "out_ptr": "*fp32", "idx_ptr": "*i32", "stage_ptr": "*fp32", "guess_ptr": "*fp32",
                     "chan_ptr": "*fp32", "basis_ptr": "*i32", "proj_ptr": "*fp32", "w_out_ptr": "*fp32",
                     "b_out_ptr": "*fp32",
                     **_ints("N", "num_n_blocks", "num_active", "proj_dim", "stride_xb", "stride_xc", "stride_xn",
                             "stride_ob", "stride_oc", "stride_on", "stride_ig", "stride_ib", "stride_in", "stride_pb",
                             "stride_pc", "stride_pn", "stride_hb", "stride_hc", "stride_hn")}
    forward_aligned = ("x_ptr", "out_ptr", "idx_ptr", "stage_ptr", "guess_ptr", "chan_ptr", "basis_ptr", "proj_ptr",
                       "w_out_ptr", "b_out_ptr", "N", "stride_xb", "stride_ob", "stride_ig", "stride_ib", "stride_pb",
                       "stride_pc", "stride_pn", "stride_hb", "stride_hc", "stride_hn")
    backward_types = {"g_ptr": "*fp32", "x_ptr": "*fp32", "dx_ptr": "*fp32", "stage_ptr": "*fp32", "guess_ptr": "*fp32",
                      "chan_ptr": "*fp32", **_ints("N", "num_n_blocks", "num_active", "stride_gb", "stride_gc",
                                                   "stride_gn", "stride_xb", "stride_xc", "stride_xn", "stride_db",
                                                   "stride_dc", "stride_dn")}
    last = dict(stride_xc=1, stride_oc=1, DENSE=True, INDEX_ROWS=True)
    out = [
        Variant("residual forward fp32 channel-last, 8x[8,5,5,5]", R._residual_forward_kernel, forward_types,
                {**common, **forward_flags, **last}, forward_aligned, warps, tags=tags),
        Variant("residual forward fp32 channel-first, 8x[8,5,5,5]", R._residual_forward_kernel, forward_types,
                {**common, **forward_flags, "DENSE": False, "INDEX_ROWS": True}, forward_aligned + ("stride_xc", "stride_oc"), warps,
                tags=tags),
        Variant("residual forward fp32 channel-last, 8x[8,5,5,5], compare chain", R._residual_forward_kernel,
                forward_types, {**common, **forward_flags, **last, "GUESS_ROWS": 0}, forward_aligned, warps, tags=tags),
        # project_out fused (dim 1024, bfloat16 under autocast: the 1024 -> 4 case, h and proj in bfloat16)
        Variant("residual forward bf16 channel-last, 8x[8,5,5,5], project_out 4->1024 bf16", R._residual_forward_kernel,
                {**forward_types, "x_ptr": "*bf16", "proj_ptr": "*bf16"},
                {**common, **last, **no_project_in, "stride_pc": 1, "BLOCK_N": proj_block, "PROJECT_OUT": True,
                 "BLOCK_K": proj_k, "HAS_B_OUT": True},
                tuple(a for a in forward_aligned if a != "stride_pc") + ("proj_dim",), proj_warps,
                tags={**tags, "dtype": "bf16", "values_per_thread": proj_block * 4 // (32 * proj_warps)}),
        # ... and project_in too (ResidualFSQ.fuse_project_in): x (b, n, 1024) bfloat16, h saved (b, n, 4) float32
        Variant("residual forward bf16 channel-last, 8x[8,5,5,5], project_in and project_out 1024->4->1024 bf16",
                R._residual_forward_kernel,
                {**forward_types, "x_ptr": "*bf16", "proj_ptr": "*bf16", "w_in_ptr": "*bf16", "b_in_ptr": "*bf16",
                 "h_ptr": "*fp32"},
                {**common, **last, "stride_xc": 1, "stride_pc": 1, "stride_hc": 1, "BLOCK_N": proj_block,
                 "PROJECT_OUT": True, "BLOCK_K": proj_k, "HAS_B_OUT": True, "PROJECT_IN": True, "HAS_B_IN": True,
                 "E_PAD": 16, "BLOCK_KI": 32, "IEEE_DOT": False, "DOT_IN_F32": False},
                tuple(a for a in forward_aligned if a not in ("stride_pc", "stride_hc")) + ("proj_dim", "w_in_ptr",
                                                                                           "b_in_ptr", "h_ptr"),
                proj_warps, tags={**tags, "dtype": "bf16", "values_per_thread": proj_block * 4 // (32 * proj_warps)}),
        Variant("residual backward fp32 channel-last, 8x[8,5,5,5]", R._residual_backward_kernel, backward_types,
                {**common, "stride_gc": 1, "stride_xc": 1, "stride_dc": 1, "DENSE": True, "KIND": 2},
                ("g_ptr", "x_ptr", "dx_ptr", "stage_ptr", "guess_ptr", "chan_ptr", "N", "stride_gb", "stride_xb",
                 "stride_db"), warps, tags=tags),
    ]
    # the soft clamp (vqp's default since 1.26: c = 1 + 1 / (L - 1) per channel, a tensor, so x / c is an IEEE
    # division), forward and backward: its product by c must be mul.rn (never fused into the first stage's subtraction)
    soft = {"SOFT_CLAMP": 1}
    out += [
        Variant(out[0].name + ", soft clamp", R._residual_forward_kernel, forward_types,
                {**out[0].constexprs, **soft}, out[0].divisible_by_16, warps, tags={**tags, "soft_clamp": 1}),
        Variant(out[-1].name + ", soft clamp", R._residual_backward_kernel, backward_types,
                {**out[-1].constexprs, **soft}, out[-1].divisible_by_16, warps, tags={**tags, "soft_clamp": 1}),
        # pre-1.26 with a Python float c: torch's CUDA division by it multiplies by its float32 reciprocal
        Variant(out[0].name + ", soft clamp by reciprocal", R._residual_forward_kernel, forward_types,
                {**out[0].constexprs, "SOFT_CLAMP": 2}, out[0].divisible_by_16, warps, tags={**tags, "soft_clamp": 2}),
    ]
    # the forwards without projections reproduce vqp bit for bit (their one multiply-add, each stage's guess
    # r * a + b, is an explicit tl.fma, exact fused or not: residual_levels.guess_table)
    for v in out:
        if v.kernel is R._residual_forward_kernel and not v.constexprs["PROJECT_OUT"]:
            v.tags = {**v.tags, "bitwise": True}
    return out


def _ptxas_report(log: str) -> tuple[int, int]:
    """(registers, spill bytes) from a ``ptxas -v`` report."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _wide_loads_before_store(lines: list[str]) -> int:
    """64- and 128-bit global loads (``LDG.E.64``, ``LDG.E.128``: rows of the tile, not the 32-bit loads of uniform
    constants) issued before the first global store, in program order."""
    count = 0
    for line in lines:
        if "STG." in line:
            break
        count += bool(re.search(r"LDG\.E\.(64|128)\b", line))
    return count


def inspect(variant: Variant, arch: int = 90) -> dict:
    """Compile ``variant`` for ``sm_<arch>``; its resources and instruction counts (see the module docstring)."""
    names = variant.kernel.arg_names
    signature = {n: ("constexpr" if n in variant.constexprs else variant.types[n]) for n in names}
    source = ASTSource(
        fn=variant.kernel, signature=signature,
        constexprs={(names.index(k),): v for k, v in variant.constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in variant.divisible_by_16},
    )
    compiled, log = _compile(source, arch, variant, enable_fp_fusion=True)
    registers, spill_bytes = _ptxas_report(log)
    lines = _sass_lines(compiled)
    contracted = {}
    if variant.tags.get("bitwise"):
        # multiply-adds the compiler formed by itself (FMUL + FADD fused: one rounding fewer than torch's ops), as the
        # FFMAs that the same kernel loses when compiled with enable_fp_fusion=False
        unfused = _sass_lines(_compile(source, arch, variant, enable_fp_fusion=False)[0])
        contracted = {"fma_contracted": _count(lines, "FFMA") - _count(unfused, "FFMA")}
    shared = int(compiled.metadata.shared)
    threads = 32 * variant.num_warps
    per_block_regs = ((registers + 7) // 8 * 8) * threads
    blocks = min(REGISTERS_PER_SM // per_block_regs, MAX_WARPS_PER_SM // variant.num_warps,
                 SHARED_PER_SM // shared if shared else MAX_WARPS_PER_SM)
    return {
        "name": variant.name, **variant.tags, "num_warps": variant.num_warps,
        "registers": registers, "spill_bytes": spill_bytes, "shared_bytes": shared,
        "instructions": sum(1 for line in lines if re.search(r"/\*[0-9a-f]{4,}\*/", line)),
        "barriers": sum(1 for line in lines if re.search(r"\bBAR\b|\bBAR\.", line)),
        "ldg128": sum(1 for line in lines if "LDG.E.128" in line),
        "stg128": sum(1 for line in lines if "STG.E.128" in line),
        "wide_loads_before_store": _wide_loads_before_store(lines),
        "mma": sum(1 for line in lines if "HGMMA" in line or "HMMA" in line),
        # float32 products and quotients rounded on their own (never contracted into an FMA), from the PTX
        "ptx_mul_rn": compiled.asm["ptx"].count("mul.rn."),
        "ptx_div_rn": compiled.asm["ptx"].count("div.rn."),
        "blocks_per_sm": blocks,
        **contracted,
    }


def _compile(source, arch: int, variant: Variant, **options):
    """``triton.compile`` for ``sm_<arch>``: the compiled kernel and Triton's ptxas report."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages, **options})
    return compiled, log.getvalue()


def _sass_lines(compiled) -> list[str]:
    """The instruction lines of the kernel's SASS (``cuobjdump --dump-sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([str(BIN / "cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    return [line for line in sass.splitlines() if "/*" in line]


def _count(lines: list[str], opcode: str) -> int:
    """Instructions of ``opcode`` (any modifiers: ``FFMA``, ``FFMA.FTZ``, ...)."""
    return sum(1 for line in lines if re.search(rf"\b{opcode}(\.[A-Z0-9.]+)?\s", line))


def main() -> int:
    """``python bench/inspect_kernels.py [ARCH] [--json]`` (ARCH 90 by default; the interpreter must be off)."""
    args = [a for a in sys.argv[1:] if a != "--json"]
    arch = int(args[0]) if args else 90
    rows = [inspect(v, arch) for v in variants()]
    if "--json" in sys.argv:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = ["name", "registers", "spill_bytes", "shared_bytes", "barriers", "ldg128", "stg128", "mma", "blocks_per_sm"]
    widths = [max(len(str(r.get(h, ""))) for r in rows + [dict(zip(header, header))]) for h in header]
    print(f"triton {triton.__version__}, sm_{arch}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(r.get(h, "")).ljust(w) for h, w in zip(header, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
