"""Command line: ``python -m fsq_triton {bench,autotune,demo}`` (also installed as ``fsq-triton``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def _bench_module():
    """``bench/bench_fsq.py`` of the source checkout this package was installed from (editable or in place)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_fsq.py"
    if not path.is_file():
        raise SystemExit(
            f"error: the benchmark lives in the repository's bench/ folder, not found at {path}; "
            "run from a source checkout (pip install -e .)"
        )
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_fsq", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fsq"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsq_triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="speed comparison: fsq_triton vs the reference, vector-quantize-pytorch, torch.compile")
    bench.add_argument("--quick", action="store_true", help="a few small cases (under two minutes on a 2-core CPU)")
    bench.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu")
    bench.add_argument("--out", default="bench-results", help="folder for results.json, results.md and results.png")

    tune = sub.add_parser("autotune", help="tune the kernels' launch configurations on this GPU and cache them")
    tune.add_argument("--quick", action="store_true", help="fewer shapes and configurations")
    tune.add_argument("--reset", action="store_true", help="clear this GPU's cached configurations first")

    demo = sub.add_parser("demo", help="quantize a video latent on whatever device is here")
    demo.add_argument("--device", choices=["cuda", "cpu"], default=None)

    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench_module().run(quick=args.quick, device=args.device, out_dir=args.out)
    if args.command == "autotune":
        from . import autotune

        return autotune.main(quick=args.quick, reset=args.reset)
    return _demo(args.device)


def _demo(device: str | None) -> int:
    import time

    import torch

    from . import FSQ

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fsq = FSQ(levels=[8, 8, 8, 5, 5, 5]).to(device)
    z = torch.randn(2, 6, 4, 32, 32, device=device)
    fsq(z)  # first call: calibration and compilation
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out, indices = fsq(z)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    used = indices.unique().numel()
    print(f"device {device}, levels {list(fsq.levels)}, codebook size {fsq.codebook_size}")
    print(f"z {tuple(z.shape)} -> out {tuple(out.shape)} {out.dtype}, indices {tuple(indices.shape)} {indices.dtype}")
    print(f"codebook usage: {used} of {fsq.codebook_size} codes ({100 * used / fsq.codebook_size:.1f}%)")
    print(f"forward: {elapsed * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
