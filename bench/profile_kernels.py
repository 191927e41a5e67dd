"""Launch the kernels that missed their targets once each, for Nsight Compute: ``ncu ... python bench/profile_kernels.py``.

The first GPU run (H200, 2026-11-28, bench/NOTES.md) left three questions that only hardware counters answer:
why the channel-first forward reaches 72% of the copy bandwidth at its best configuration while the backward
over the same rows reaches 100% (issue slots? the per-thread loads of each channel's constants? too few bytes
in flight?), why bfloat16 does worse, and why the residual forward (8 stages) runs at 8.9x its bound. This
script launches each of those kernels twice on the video-sized input (the first launch compiles; ncu profiles
both) and writes the launch order to ``--order`` so that ncu's rows can be named:

    ncu --clock-control none --target-processes all -k regex:'_fsq_|_residual_' \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --csv --page details --log-file ncu.csv python bench/profile_kernels.py --order order.json

GPU only. ``bench/gpu_check.py`` runs it as its profiling step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fsq_triton import ResidualFSQ, autotune  # noqa: E402
from fsq_triton.levels import level_tables  # noqa: E402
from fsq_triton.ops import fsq as ops  # noqa: E402

LEVELS = [8, 8, 8, 5, 5, 5]
TOKENS = 32 * 32 * 128 * 128  # the video case of the GPU check: (32, 6, 32*128*128) channel-first
RESIDUAL_TOKENS = 5_000_000  # 20M values of 8x[8, 5, 5, 5], as scripts/residual_gpu_check.py


def launches(dev: torch.device, scale: int = 1):
    """(name, zero-argument launch) for each profiled kernel launch; ``scale`` divides the token counts."""
    tables = level_tables(LEVELS, dev, "tanh_shift")
    z32 = torch.randn(32, len(LEVELS), TOKENS // 32 // scale, device=dev) * 2
    z16 = z32.to(torch.bfloat16)
    g32 = torch.randn_like(z32)

    def forward(z, cfg):
        def run():
            with autotune.forced_config(cfg):
                ops.forward_triton(z, tables.values, tables.integers, 1, False)
        return run

    def backward(cfg):
        def run():
            with autotune.forced_config(cfg):
                ops.backward_triton(g32, z32, tables.values, False)
        return run

    out = []
    for cfg in ({"BLOCK_N": 1024, "num_warps": 8}, {"BLOCK_N": 256, "num_warps": 4}):
        out.append((f"forward float32 channel-first BLOCK_N={cfg['BLOCK_N']} num_warps={cfg['num_warps']}", forward(z32, cfg)))
    out.append(("forward bfloat16 channel-first BLOCK_N=1024 num_warps=4", forward(z16, {"BLOCK_N": 1024, "num_warps": 4})))
    out.append(("backward float32 channel-first BLOCK_N=1024 num_warps=8", backward({"BLOCK_N": 1024, "num_warps": 8})))

    residual = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=8).to(dev).eval()
    x = torch.randn(1, RESIDUAL_TOKENS // scale, 4, device=dev) * 1.5

    def residual_forward():
        with torch.no_grad():
            residual(x)
    out.append(("residual forward 8x[8,5,5,5] float32 (soft clamp in torch ops: its elementwise kernels are not matched)",
                residual_forward))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", default="profile_order.json", help="where to write the launch order (JSON list)")
    parser.add_argument("--cpu", action="store_true",
                        help="plumbing check: tiny sizes on CPU tensors, kernels under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.cpu:
        dev, scale = torch.device("cpu"), 2**14
    elif torch.cuda.is_available():
        dev, scale = torch.device("cuda"), 1
    else:
        print("profile_kernels.py needs a CUDA GPU (or --cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    order = []
    for name, run in launches(dev, scale):
        for attempt in ("compile", "profiled"):
            run()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            order.append(f"{name} [{attempt}]")
            print(order[-1], flush=True)
        Path(args.order).write_text(json.dumps(order, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
