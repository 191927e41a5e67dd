"""The residual FSQ GPU check: index parity with vqp on 20M elements, and the issue's speed targets, as JSON lines.

    python scripts/residual_gpu_check.py                      # on a CUDA machine with vector-quantize-pytorch
    python scripts/residual_gpu_check.py --elements 100000000 --out residual.json   # more elements, the report in a file
    python scripts/residual_gpu_check.py --elements 65536 --device cpu   # a dry run of the plumbing

Each result is printed as soon as it is measured, one JSON object a line, flushed: ``{"environment": ...}``, then
``{"parity": ...}`` for each semantics, then ``{"speed": ...}`` after each implementation is timed (each line holds
every row timed so far and the ratios they allow, so the last one is the whole speed result). A run cut short (the
GPU check's time limit) keeps the lines it printed. ``--out FILE`` also rewrites the assembled report there (one
indented JSON object: the environment's keys, ``parity``, ``speed``) after each line.

The default of 20M elements finished in under 75 s on an H200 (torch 2.11, triton 3.6, 2026-11-28), Python's start and
the compiles included; 100M did not finish in the GPU check's 45 s. ``torch.compile`` of vqp is timed last, so a cut
loses that row first.

For each semantics (``current`` against the installed vqp, which must be >= 1.26; ``pre-1.26`` only counts
fsq_triton's kernel against its own torch path, which replays vqp 1.25.2's ops), on ``ResidualFSQ(levels=[8, 5, 5, 5],
num_quantizers=8)``:

- ``index_mismatches``: indices of the fused kernel (the soft clamp where ``ResidualFSQ.soft_clamp_in_kernel``'s
  default puts it: in torch ops on CUDA) that differ from vqp's over ``--elements`` (default 20M) float32 inputs
  (``randn * 1.5``, in chunks), plus the largest difference of the quantized output; and the same count with the soft
  clamp forced into the kernel (``soft_clamp_in_kernel = True``: ``..._soft_clamp_in_kernel``) and into torch ops
  (``False``: ``..._soft_clamp_in_torch``): if only the first of those is non-zero, Triton's ``tanh`` differs from
  torch's on this device;
- ``grad_max_abs_diff``: the input gradient against autograd through vqp, on the first chunk;
- timings (median of CUDA-event repeats after an L2 flush) of forward and forward+backward for fsq_triton, vqp eager and
  ``torch.compile`` of vqp, and the bandwidth bound of one forward pass (read ``x``, write the quantized sum and the
  8 int32 indices per token) at the measured copy bandwidth.

Targets (issue 12): forward within 1.3x of the bound, >= 10x vqp eager and >= 3x its torch.compile, forward+backward
>= 5x vqp, 0 index mismatches (or the count and why).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fsq_triton  # noqa: E402

LEVELS, STAGES = [8, 5, 5, 5], 8


def _time_ms(fn, device, repeats=20, warmup=3):
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _copy_gbs(device):
    src = torch.ones(2**27, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


def parity(semantics: str, elements: int, device, vqp):
    ours = fsq_triton.ResidualFSQ(levels=LEVELS, num_quantizers=STAGES, semantics=semantics).to(device).eval()
    if semantics == "current":
        oracle = vqp.ResidualFSQ(levels=LEVELS, num_quantizers=STAGES).to(device).eval()
    else:  # vqp 1.25.2 is not installed next to 1.32: its op sequence is fsq_triton's torch path
        oracle = fsq_triton.ResidualFSQ(levels=LEVELS, num_quantizers=STAGES, semantics=semantics, backend="torch").to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    chunk_tokens = 1 << 22
    tokens = elements // len(LEVELS)
    mismatches, max_diff, done = 0, 0.0, 0
    forced = {True: 0, False: 0}  # soft_clamp_in_kernel forced on and off
    while done < tokens:
        n = min(chunk_tokens, tokens - done)
        x = torch.randn(1, n, len(LEVELS), generator=generator, device=device) * 1.5
        with torch.no_grad():
            q_ours, i_ours = ours(x)
            q_ref, i_ref = oracle(x)
        mismatches += int((i_ours != i_ref).sum())
        if semantics == "current":  # the same with the soft clamp forced into the kernel, and into torch ops
            default = fsq_triton.ResidualFSQ.soft_clamp_in_kernel
            try:
                for inside in forced:
                    fsq_triton.ResidualFSQ.soft_clamp_in_kernel = inside
                    with torch.no_grad():
                        forced[inside] += int((ours(x)[1] != i_ref).sum())
            finally:
                fsq_triton.ResidualFSQ.soft_clamp_in_kernel = default
        max_diff = max(max_diff, float((q_ours - q_ref).abs().max()))
        if done == 0:
            xo, xr = x[:, :65536].clone().requires_grad_(True), x[:, :65536].clone().requires_grad_(True)
            g = torch.randn_like(xo)
            ours(xo)[0].backward(g)
            oracle(xr)[0].backward(g)
            grad_diff = float((xo.grad - xr.grad).abs().max())
        done += n
    return {"semantics": semantics, "elements": tokens * len(LEVELS), "index_mismatches": mismatches,
            "index_mismatches_soft_clamp_in_kernel": forced[True], "index_mismatches_soft_clamp_in_torch": forced[False],
            "quantized_max_abs_diff": max_diff, "grad_max_abs_diff": grad_diff}


def speed(elements: int, device, vqp, bandwidth_gbs: float, on_row: Callable[[dict], None] | None = None):
    """Timings of fsq_triton, vqp eager and vqp under torch.compile (the slowest to set up, last); ``on_row(result)``
    after each one, with the rows so far and the ratios they allow."""
    tokens = elements // len(LEVELS)
    x = torch.randn(1, tokens, len(LEVELS), device=device)
    grad = torch.randn_like(x)
    ours = fsq_triton.ResidualFSQ(levels=LEVELS, num_quantizers=STAGES).to(device)
    rows = {"fsq_triton": ours}
    if vqp is not None:
        reference = vqp.ResidualFSQ(levels=LEVELS, num_quantizers=STAGES).to(device)
        rows["vqp eager"] = reference
        if device.type == "cuda":
            rows["vqp torch.compile"] = torch.compile(reference, dynamic=False)
    out = {}
    bound_bytes = tokens * len(LEVELS) * 4 * 2 + tokens * STAGES * 4
    result = {"elements": tokens * len(LEVELS), "copy_bandwidth_gbs": bandwidth_gbs,
              "forward_bound_ms": bound_bytes / (bandwidth_gbs * 1e9) * 1e3, "rows": out}
    for name, module in rows.items():
        def forward():
            with torch.no_grad():
                module(x)

        leaf = x.clone().requires_grad_(True)

        def training():
            leaf.grad = None
            module(leaf)[0].backward(grad)

        out[name] = {"forward_ms": _time_ms(forward, device), "forward_backward_ms": _time_ms(training, device)}
        ours_ms = out["fsq_triton"]
        result["forward_over_bound"] = ours_ms["forward_ms"] / result["forward_bound_ms"]
        for other in ("vqp eager", "vqp torch.compile"):
            if other in out:
                result[f"forward_speedup_vs_{other}"] = out[other]["forward_ms"] / ours_ms["forward_ms"]
                result[f"forward_backward_speedup_vs_{other}"] = out[other]["forward_backward_ms"] / ours_ms["forward_backward_ms"]
        if on_row is not None:
            on_row(result)
    return result


class Report:
    """The report, assembled from the lines as they are printed (and rewritten to ``--out`` after each)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.data: dict = {}

    def emit(self, kind: str, value: dict) -> None:
        print(json.dumps({kind: value}), flush=True)
        if kind == "environment":
            self.data.update(value)
        elif kind == "parity":
            self.data.setdefault("parity", []).append(value)
        else:
            self.data[kind] = value
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            os.replace(tmp, self.path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=20_000_000, help="elements of the parity check (default 20M)")
    parser.add_argument("--speed-elements", type=int, default=None, help="elements of the timed input (default: --elements)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="also write the assembled report (one JSON object) to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        vqp = None
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "vqp": getattr(vqp, "__version__", None) if vqp else None}
    try:
        from importlib.metadata import version
        report["vqp"] = version("vector-quantize-pytorch") if vqp else None
        import triton
        report["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 (versions are informative only)
        pass
    out = Report(args.out)
    out.emit("environment", report)
    for semantics in (["current"] if vqp else []) + ["pre-1.26"]:
        out.emit("parity", parity(semantics, args.elements, device, vqp))
    speed(args.speed_elements or args.elements, device, vqp, _copy_gbs(device), on_row=lambda row: out.emit("speed", row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
