"""Command line: ``python -m fsq_triton {bench,autotune,demo}`` (also installed as ``fsq-triton``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _program_name() -> str:
    """How the user invoked us: ``python -m fsq_triton``, or the script's own name (``fsq-triton``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "fsq_triton.__main__":
        return "python -m fsq_triton"
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "fsq-triton"


def _cuda_missing(device: str | None, command: str) -> bool:
    """True (after printing why) when ``--device cuda`` was asked for on a machine without CUDA."""
    if device != "cuda":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    print(f"error: {command} --device cuda asked for, but CUDA is not available here; "
          "leave --device out to use the CPU", file=sys.stderr)
    return True


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, found {value}")
    return value


def _bench(args: argparse.Namespace) -> int:
    """``bench``: the harness of the installed package, once its extra is known to be there."""
    from .bench import BENCH_EXTRA, missing_requirements

    missing = missing_requirements()
    if missing:
        print(f"error: the bench needs {', '.join(missing)}, from the bench extra: {BENCH_EXTRA}", file=sys.stderr)
        return 2
    if _cuda_missing(args.device, "bench"):
        return 2
    from .bench import harness

    return harness.run(quick=args.quick, device=args.device, out_dir=args.out, smoke=args.smoke, threads=args.threads,
                       compiled=not args.no_compile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="fsq_triton: the speed comparison (bench), launch-configuration tuning (autotune) and a demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="speed comparison: fsq_triton vs the reference, vector-quantize-pytorch, torch.compile")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few small cases (under 30 s on a 2-core CPU)")
    size.add_argument("--smoke", action="store_true",
                      help="one tiny case of each kind, two repeats: checks that everything runs (not a measurement)")
    bench.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu")
    bench.add_argument("--out", default="bench-results", help="folder for results.json, results.md and results.png")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help="PyTorch CPU threads for a CPU run (default 1: steadier figures on a busy machine)")
    bench.add_argument("--no-compile", action="store_true",
                       help="leave out the rows that torch.compile builds (fsq_triton compiled, torch.compile of the "
                            "reference) and the ResidualFSQ cases (their rows include vqp under torch.compile): "
                            "on a GPU most of a --quick run's time is those compiles")

    tune = sub.add_parser("autotune", help="tune the kernels' launch configurations on this GPU and cache them")
    tune.add_argument("--quick", action="store_true",
                      help="4 small shapes, each kernel timed over at most 3 configurations (4 warps with 256 or 1024 tokens a "
                           "program, and the default) instead of its whole space")
    tune.add_argument("--reset", action="store_true", help="clear this GPU's cached configurations first")

    demo = sub.add_parser("demo", help="quantize a video latent on whatever device is here")
    demo.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu")

    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "autotune":
        from . import autotune

        return autotune.main(quick=args.quick, reset=args.reset)
    if _cuda_missing(args.device, "demo"):
        return 2
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
