"""The residual FSQ GPU check: index parity with vqp on 100M elements, and the issue's speed targets, as one JSON.

    python scripts/residual_gpu_check.py                      # on a CUDA machine with vector-quantize-pytorch
    python scripts/residual_gpu_check.py --elements 65536 --device cpu   # a dry run of the plumbing

For each semantics (``current`` against the installed vqp, which must be >= 1.26; ``pre-1.26`` only counts
fsq_triton's kernel against its own torch path, which replays vqp 1.25.2's ops), on ``ResidualFSQ(levels=[8, 5, 5, 5],
num_quantizers=8)``:

- ``index_mismatches``: indices of the fused kernel that differ from vqp's over ``--elements`` float32 inputs
  (``randn * 1.5``, in chunks), plus the largest difference of the quantized output; and the same count with the soft
  clamp applied in torch ops (``ResidualFSQ.soft_clamp_in_kernel = False``): if only the first is non-zero, Triton's
  ``tanh`` differs from torch's on this device;
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
import statistics
import sys
import time
from pathlib import Path

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
    mismatches, mismatches_outside, max_diff, done = 0, 0, 0.0, 0
    while done < tokens:
        n = min(chunk_tokens, tokens - done)
        x = torch.randn(1, n, len(LEVELS), generator=generator, device=device) * 1.5
        with torch.no_grad():
            q_ours, i_ours = ours(x)
            q_ref, i_ref = oracle(x)
        mismatches += int((i_ours != i_ref).sum())
        if semantics == "current":  # the same with the soft clamp in torch ops (ResidualFSQ.soft_clamp_in_kernel)
            fsq_triton.ResidualFSQ.soft_clamp_in_kernel = False
            with torch.no_grad():
                mismatches_outside += int((ours(x)[1] != i_ref).sum())
            fsq_triton.ResidualFSQ.soft_clamp_in_kernel = True
        max_diff = max(max_diff, float((q_ours - q_ref).abs().max()))
        if done == 0:
            xo, xr = x[:, :65536].clone().requires_grad_(True), x[:, :65536].clone().requires_grad_(True)
            g = torch.randn_like(xo)
            ours(xo)[0].backward(g)
            oracle(xr)[0].backward(g)
            grad_diff = float((xo.grad - xr.grad).abs().max())
        done += n
    return {"semantics": semantics, "elements": tokens * len(LEVELS), "index_mismatches": mismatches,
            "index_mismatches_soft_clamp_in_torch": mismatches_outside,
            "quantized_max_abs_diff": max_diff, "grad_max_abs_diff": grad_diff}


def speed(elements: int, device, vqp, bandwidth_gbs: float):
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
    for name, module in rows.items():
        def forward():
            with torch.no_grad():
                module(x)

        leaf = x.clone().requires_grad_(True)

        def training():
            leaf.grad = None
            module(leaf)[0].backward(grad)

        out[name] = {"forward_ms": _time_ms(forward, device), "forward_backward_ms": _time_ms(training, device)}
    bound_bytes = tokens * len(LEVELS) * 4 * 2 + tokens * STAGES * 4
    result = {"elements": tokens * len(LEVELS), "copy_bandwidth_gbs": bandwidth_gbs,
              "forward_bound_ms": bound_bytes / (bandwidth_gbs * 1e9) * 1e3, "rows": out}
    ours_ms = out["fsq_triton"]
    result["forward_over_bound"] = ours_ms["forward_ms"] / result["forward_bound_ms"]
    for name in ("vqp eager", "vqp torch.compile"):
        if name in out:
            result[f"forward_speedup_vs_{name}"] = out[name]["forward_ms"] / ours_ms["forward_ms"]
            result[f"forward_backward_speedup_vs_{name}"] = out[name]["forward_backward_ms"] / ours_ms["forward_backward_ms"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=100_000_000)
    parser.add_argument("--speed-elements", type=int, default=None, help="elements of the timed input (default: --elements)")
    parser.add_argument("--device", default="cuda")
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
        report["vqp"] = version("vector-quantize-pytorch")
        import triton
        report["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 (versions are informative only)
        pass
    report["parity"] = [parity(s, args.elements, device, vqp) for s in (["current"] if vqp else []) + ["pre-1.26"]]
    report["speed"] = speed(args.speed_elements or args.elements, device, vqp, _copy_gbs(device))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
