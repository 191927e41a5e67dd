"""Time the core kernels on the video case over launch configurations, to choose the default heuristic.

    python bench/config_sweep.py [--out DIR] [--limit-s 60]

The video case of the GPU check (32x6x32x128x128, levels [8, 8, 8, 5, 5, 5], channel-first): the forward kernel in
float32 and bfloat16 and the backward in float32, the configurations of ``fsq_triton.autotune.config_space`` with
``BLOCK_N`` >= 256 and 4 or 8 warps (and the default) forced in turn (``autotune.forced_config``), timed with ``triton.testing.do_bench`` (median). Prints one line a
configuration and writes ``DIR/sweep.json`` after each, so a run cut short keeps what it measured. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fsq_triton import autotune  # noqa: E402
from fsq_triton.levels import level_tables  # noqa: E402
from fsq_triton.ops import fsq as ops  # noqa: E402

SHAPE, LEVELS = (32, 6, 32, 128, 128), [8, 8, 8, 5, 5, 5]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--limit-s", type=float, default=60.0, help="stop starting new rows after this many seconds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("config_sweep.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    start, rows, path = time.monotonic(), [], Path(args.out) / "sweep.json"
    dev = torch.device("cuda")
    tables = level_tables(LEVELS, dev, "tanh_shift")
    b, d, t, h, w = SHAPE
    for kernel, dtype in (("forward", torch.float32), ("forward", torch.bfloat16), ("backward", torch.float32)):
        z = (torch.randn(b, d, t * h * w, device=dev) * 2).to(dtype)  # (b, c*d, n) channel-first feature view
        g = torch.randn_like(z)
        elems = z.numel()
        moved = elems * z.element_size() * (2 if kernel == "forward" else 3) + (elems // d * 4 if kernel == "forward" else 0)
        tile = 8  # the padded channel tile of both kernels: next_pow2(c * d) = next_pow2(6)
        default = autotune.default_config(tile, elems // d, kernel=kernel, element_size=z.element_size(), channels_last=False)
        space = [c for c in autotune.config_space(tile) if c["BLOCK_N"] >= 256 and c["num_warps"] in (4, 8)]
        for cfg in space + ([default] if default not in space else []):
            if time.monotonic() - start > args.limit_s:
                break
            with autotune.forced_config(cfg):
                if kernel == "forward":
                    fn = lambda: ops.forward_triton(z, tables.values, tables.integers, 1, False)  # noqa: E731
                else:
                    fn = lambda: ops.backward_triton(g, z, tables.values, False)  # noqa: E731
                ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
            row = {"kernel": kernel, "dtype": str(dtype).replace("torch.", ""), **cfg, "ms": round(ms, 4),
                   "gbs": round(moved / ms / 1e6, 1), "default": cfg == default}
            rows.append(row)
            print(json.dumps(row), flush=True)
            path.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
