"""pytest-benchmark suite: ``pytest bench --benchmark-only`` (plain ``pytest`` collects only ``tests/``).

One benchmark per (workload, mode, implementation), grouped by workload and mode so that each group
compares the implementations on the same work. The workloads are those of ``fsq_triton.bench.harness`` (the full
list on CUDA, small shapes on CPU so that the suite takes about a minute). On CUDA the timed function
synchronises the device, so each round measures finished work. The caches are not flushed between
rounds here: ``python -m fsq_triton bench`` gives the bandwidth figures.

Save a run with ``--benchmark-autosave`` and compare a later one against it with
``--benchmark-compare`` (see bench/README.md).
"""

from __future__ import annotations

import pytest
import torch

from fsq_triton.bench.harness import IMPLS, MODES, Workload, build_impls, make_inputs, memory_shortfall, mode_step, workloads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _workloads() -> list[Workload]:
    if DEVICE.type == "cuda":
        return workloads("full", "cuda")
    f32, bf16 = torch.float32, torch.bfloat16
    return [
        Workload("image", (8, 5, 32, 32), (8, 5, 5, 5, 5), f32),
        Workload("video", (1, 6, 4, 32, 32), (8, 8, 8, 5, 5, 5), bf16),
        Workload("sequence+proj", (1, 256, 1024), (8, 5, 5, 5), bf16, dim=1024),
        Workload("two-codebooks", (4, 1024, 8), (8, 5, 5, 5), f32, num_codebooks=2),
    ]


CASES = [(wl, mode, impl) for wl in _workloads() for mode in MODES for impl in IMPLS]


def _id(case) -> str:
    wl, mode, impl = case
    return f"{wl.label.replace(' ', '-')}-{mode}-{impl}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_fsq(benchmark, case):
    wl, mode, name = case
    benchmark.group = f"{wl.label} {mode}"
    shortfall = memory_shortfall(wl, DEVICE)
    if shortfall:
        pytest.skip(shortfall)
    impls, notes = build_impls(wl, DEVICE)
    impl = next((i for i in impls if i.name == name), None)
    if impl is None:
        pytest.skip("; ".join(n for n in notes if n.startswith(name)) or f"{name} does not run on {DEVICE.type}")
    benchmark.extra_info.update(dtype=str(impl.dtype), notes=impl.notes)

    z, grads, indices = make_inputs(wl, DEVICE)
    setup, fn = mode_step(impl, mode, z.to(impl.dtype), grads, indices)
    try:  # first call outside the timings: calibration, compilation
        setup()
        fn()
    except RuntimeError as err:
        if name == "vqp":  # e.g. its decode cannot feed float32 codes to bfloat16 projection weights
            pytest.skip(f"vqp cannot run this case: {err}")
        raise

    def timed():
        setup()
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark(timed)
