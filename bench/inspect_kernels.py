"""Compile every kernel for a GPU architecture without a GPU, and read the machine code: ``python bench/inspect_kernels.py``.

Triton compiles ahead of time for a target (``GPUTarget("cuda", 90, 32)`` is Hopper: H100, H200) with the
``ptxas`` and ``cuobjdump`` its wheel ships, so the real compiler's verdict (which the CPU interpreter
never gives) and the resource report are available on any machine. For each kernel variant this prints
the registers, stack and local memory (spills) per thread, and counts the memory and matrix instructions
in the SASS: 128-bit global loads and stores (``LDG.E.128``/``STG.E.128``) for coalesced streaming,
``HGMMA`` (Hopper tensor-core matrix products) for the fused projections.

Run it without ``TRITON_INTERPRET`` (the interpreter's kernels cannot be compiled). The variants are what
the launchers produce for the common cases: contiguous channel-first inputs
(token stride 1 and strides divisible by 16, which Triton specializes on), float32 and bfloat16.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fsq_triton.ops.fsq as F  # noqa: E402
import fsq_triton.ops.fsq_projected as P  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_OPS = ("LDG.E.128", "STG.E.128", "HGMMA", "HMMA")


@dataclass
class Variant:
    name: str
    kernel: object
    types: dict          # non-constexpr argument -> Triton type string
    constexprs: dict     # argument -> value (specialized strides included)
    divisible_by_16: tuple
    num_warps: int


def _ints(*names):
    return {n: "i32" for n in names}


def variants() -> list[Variant]:
    out = []
    for dt in ("fp32", "bf16"):
        out.append(Variant(
            f"forward {dt} channel-first, levels up to 8", F._fsq_forward_kernel,
            {"z_ptr": "*" + dt, "out_ptr": "*" + dt, "idx_ptr": "*i32", "val_ptr": "*fp32", "int_ptr": "*i32",
             **_ints("N", "num_n_blocks", "stride_zb", "stride_zc", "stride_ob", "stride_oc")},
            dict(stride_zn=1, stride_on=1, C=1, D=6, C_PAD=1, D_PAD=8, MAX_LEVEL=8, BLOCK_N=1024, OFFSET_64=False),
            ("z_ptr", "out_ptr", "idx_ptr", "val_ptr", "int_ptr", "N", "stride_zb", "stride_zc", "stride_ob", "stride_oc"), 8,
        ))
        out.append(Variant(
            f"backward {dt} channel-first", F._fsq_backward_kernel,
            {"g_ptr": "*" + dt, "z_ptr": "*" + dt, "dz_ptr": "*" + dt, "val_ptr": "*fp32",
             **_ints("N", "num_n_blocks", "stride_gb", "stride_gc", "stride_zb", "stride_zc", "stride_db", "stride_dc")},
            dict(stride_gn=1, stride_zn=1, stride_dn=1, CD=6, D=6, CD_PAD=8, MAX_LEVEL=8, BLOCK_N=1024, OFFSET_64=False),
            ("g_ptr", "z_ptr", "dz_ptr", "val_ptr", "N", "stride_gb", "stride_gc", "stride_zb", "stride_zc", "stride_db", "stride_dc"), 8,
        ))
        out.append(Variant(
            f"projected forward {dt} channel-last, dim 1024", P._fsq_projected_forward_kernel,
            {"x_ptr": "*" + dt, "w_in_ptr": "*" + dt, "b_in_ptr": "*" + dt, "w_out_ptr": "*" + dt, "b_out_ptr": "*" + dt,
             "out_ptr": "*" + dt, "idx_ptr": "*i32", "h_ptr": "*fp32", "val_ptr": "*fp32", "int_ptr": "*i32",
             **_ints("N", "num_n_blocks", "DIM", "stride_xb", "stride_xn", "stride_ob", "stride_on")},
            dict(stride_xc=1, stride_oc=1, C=1, D=4, E_PAD=16, MAX_LEVEL=8, BLOCK_N=128, BLOCK_K=64, SAVE_H=True,
                 IEEE_DOT=dt == "fp32", DOT_IN_F32=False, OFFSET_64=False),
            ("x_ptr", "w_in_ptr", "w_out_ptr", "out_ptr", "idx_ptr", "h_ptr", "val_ptr", "int_ptr", "N", "DIM",
             "stride_xb", "stride_xn", "stride_ob", "stride_on"), 4,
        ))
    out.append(Variant(
        "forward fp32, 64-bit offsets, levels 100", F._fsq_forward_kernel,
        {"z_ptr": "*fp32", "out_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*fp32", "int_ptr": "*i32",
         **_ints("N", "num_n_blocks", "stride_zb", "stride_zc", "stride_zn", "stride_ob", "stride_oc", "stride_on")},
        dict(C=2, D=3, C_PAD=2, D_PAD=4, MAX_LEVEL=100, BLOCK_N=512, OFFSET_64=True), (), 8,
    ))
    out.append(Variant(
        "decode fp32 channel-first", F._fsq_decode_kernel,
        {"idx_ptr": "*i32", "out_ptr": "*fp32", "val_ptr": "*fp32", "int_ptr": "*i32",
         **_ints("N", "num_n_blocks", "codebook_size", "stride_ob", "stride_oc")},
        dict(stride_on=1, C=1, D=6, C_PAD=1, D_PAD=8, MAX_LEVEL=8, BLOCK_N=1024, OFFSET_64=False),
        ("idx_ptr", "out_ptr", "val_ptr", "int_ptr", "N", "stride_ob", "stride_oc"), 8,
    ))
    out.append(Variant(
        "projected decode bf16, 2 codebooks", P._fsq_projected_decode_kernel,
        {"idx_ptr": "*i32", "w_out_ptr": "*bf16", "b_out_ptr": "*bf16", "out_ptr": "*bf16", "val_ptr": "*fp32",
         "int_ptr": "*i32", **_ints("N", "num_n_blocks", "DIM", "codebook_size", "stride_ob", "stride_on")},
        dict(stride_oc=1, C=2, D=4, E_PAD=16, MAX_LEVEL=8, BLOCK_N=128, BLOCK_K=64, IEEE_DOT=False, DOT_IN_F32=False,
             OFFSET_64=False),
        ("idx_ptr", "w_out_ptr", "out_ptr", "val_ptr", "int_ptr", "N", "DIM", "stride_ob", "stride_on"), 4,
    ))
    return out


def inspect(variant: Variant, arch: int = 90) -> dict:
    """Compile ``variant`` for ``sm_<arch>``; its resource usage and SASS instruction counts."""
    names = variant.kernel.arg_names
    signature = {n: ("constexpr" if n in variant.constexprs else variant.types[n]) for n in names}
    source = ASTSource(
        fn=variant.kernel, signature=signature,
        constexprs={(names.index(k),): v for k, v in variant.constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in variant.divisible_by_16},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": variant.num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    row = {"kernel": variant.name, **{k.lower(): int(v) for k, v in fields.items()}}
    for op in SASS_OPS:
        row[op] = sum(1 for line in sass.splitlines() if op in line)
    return row


def main() -> int:
    """``python bench/inspect_kernels.py [ARCH] [--json]`` (ARCH 90 by default; run with TRITON_INTERPRET unset)."""
    args = [a for a in sys.argv[1:] if a != "--json"]
    arch = int(args[0]) if args else 90
    rows = [inspect(v, arch) for v in variants()]
    if "--json" in sys.argv:
        print(json.dumps(rows))
        return 0
    header = ["kernel", "reg", "stack", "local", "shared", *SASS_OPS]
    widths = [max(len(str(r.get(h, ""))) for r in rows + [dict(zip(header, header))]) for h in header]
    print(f"triton {triton.__version__}, sm_{arch}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(r.get(h, "")).ljust(w) for h, w in zip(header, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
