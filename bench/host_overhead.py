"""Host-side cost of one eager ``fsq(z)`` up to the kernel launch, on any machine: ``python bench/host_overhead.py``.

The Triton launch itself is replaced by a no-op, so what is timed is fsq_triton's own Python path (input
checks, table lookup, autograd.Function, launcher, launch configuration) on the tiny 64x5x32x32 input of
issue 5. Compare with ``torch.add`` on a one-element tensor, a floor for any eager call. On a GPU machine,
bench/gpu_targets.py times the real thing.
"""

import time

import torch

import fsq_triton.ops as ops
import fsq_triton.ops.fsq as fsq_ops
from fsq_triton import FSQ


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int = 5000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    fsq_ops._launch = lambda kernel, probe: _NoLaunch()
    fsq_ops._runs_triton = lambda t: True  # take the Triton path on CPU tensors, minus the launch
    fsq = FSQ([8, 5, 5, 5, 5])
    fsq._triton_ops = lambda t: ops
    z = torch.randn(64, 5, 32, 32)
    one = torch.empty(1)
    with torch.no_grad():
        print(f"fsq(z), launch stubbed: {per_call_us(lambda: fsq(z)):.1f} us per call")
        print(f"torch.add on one element: {per_call_us(lambda: torch.add(one, 1.0)):.1f} us per call")


if __name__ == "__main__":
    main()
