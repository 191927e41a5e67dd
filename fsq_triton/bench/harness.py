"""Speed of ``fsq_triton.FSQ`` next to the reference FSQ, vector-quantize-pytorch and torch.compile.

Run ``python -m fsq_triton bench [--quick | --smoke] [--device cuda|cpu] [--out DIR] [--no-compile]``, which calls :func:`run`
(it needs the ``bench`` extra: ``pip install "fsq_triton[bench]"``).
Every workload is timed in three modes, for every implementation, in one process:

- ``inference``: ``fsq(z)`` under ``torch.no_grad()``;
- ``training``: ``out, _ = fsq(z); out.backward(grad_out)`` with a fixed random ``grad_out``;
- ``decode``: ``fsq.indices_to_codes(indices)`` under ``torch.no_grad()``.

Implementations: ``fsq_triton`` (``fsq_triton.FSQ``, default backend), ``reference``
(:class:`fsq_triton.bench.reference.ReferenceFSQ`, eager), ``vqp`` (``vector_quantize_pytorch.FSQ``, when importable) and
``torch.compile`` (of the reference, on CUDA only). All share the reference's projection weights. ``--no-compile``
leaves out every row that Inductor compiles (``torch.compile`` and ``fsq_triton compiled``; the ResidualFSQ cases,
whose rows include vqp under ``torch.compile``, are left out whole): most of a ``--quick`` run's time on a GPU.

The *bandwidth bound* of a case is the time to move the bytes it cannot avoid (see
:meth:`Workload.bytes_moved`) at the device's copy bandwidth, measured in the same run; ``% of
bound`` is that time over the measured median. Timing: the first call is timed on its own (it
includes level calibration, Triton compilation and torch.compile), then warm-up calls, then
repeats whose median is reported; on CUDA each repeat is timed with CUDA events after writing a
256 MB buffer, so that no input sits in L2 from the previous repeat.

Shape letters: ``b`` batch, ``n`` tokens, ``c`` codebooks, ``d`` channels (``dim``), ``t, h, w`` video axes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

import fsq_triton
from fsq_triton._mode import interpreting

from .reference import ReferenceFSQ

MODES = ("inference", "training", "decode")
IMPLS = ("fsq_triton", "fsq_triton compiled", "reference", "vqp", "torch.compile")  # table order; the reference is measured first
FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (50 MB on H100, 60 MB on H200)
# Peak memory of one case, in float32 copies of z: its inputs plus the 11 to 19 copies that one implementation's
# training step was seen to hold on CPU; a case that cannot have them free is skipped rather than crashing.
PEAK_FLOAT32_COPIES = 24
CPU_NOTE = "CPU run: fsq_triton uses its PyTorch path; the Triton kernels run on CUDA"
CPU_PROJECTION_NOTE = (
    "CPU run: the projection cases run in float32 (bfloat16 on CUDA): the reference cannot run bfloat16 "
    "projection weights, so a bfloat16 row would time bfloat16 matrix products against float32 ones, "
    "which measures the CPU's bfloat16 units, not FSQ"
)
SIZES = ("full", "quick", "smoke")
# PyTorch's CPU worker threads spin while they wait for each other; on a machine whose cores are busy with other
# work that multiplies the medians (measured: --quick took 100 s with 2 threads and 24 s with 1 on 2 busy cores).
CPU_THREADS = 1
CPU_THREADS_WHY = "one thread by default, so that other work on the machine cannot stall a worker thread and multiply a median"
NO_COMPILE_NOTE = ("--no-compile: no torch.compile rows (neither the reference's nor fsq_triton compiled), and no "
                   "ResidualFSQ cases (their rows include vqp under torch.compile)")
INTERPRETER_NOTE = "CPU run under TRITON_INTERPRET=1: fsq_triton runs its kernels in Triton's interpreter (not a speed figure)"


# --------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One input configuration: ``z`` of ``shape``, channel-first ``(b, d, *spatial)`` or a sequence ``(b, n, d)``."""

    name: str
    shape: tuple[int, ...]
    levels: tuple[int, ...]
    dtype: torch.dtype
    dim: int | None = None
    num_codebooks: int = 1
    # vector-quantize-pytorch FSQ options, as (name, value) pairs (e.g. preserve_symmetry): the reference has none of
    # them, so such a case compares fsq_triton with vqp built with the same options
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.shape))} {_dtype_name(self.dtype)}"

    @property
    def channel_first(self) -> bool:
        return len(self.shape) >= 4 or bool(dict(self.options).get("channel_first", False))

    @property
    def has_projections(self) -> bool:
        return self.dim is not None and self.dim != len(self.levels) * self.num_codebooks

    @property
    def indices_shape(self) -> tuple[int, ...]:
        """``(b, *spatial)`` or ``(b, n)``, with a trailing ``c`` when there are several codebooks."""
        lead = (self.shape[0], *self.shape[2:]) if self.channel_first else self.shape[:2]
        return (*lead, self.num_codebooks) if self.num_codebooks > 1 else lead

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bytes_moved(self, mode: str) -> int:
        """Bytes that any implementation must move, at fsq_triton's dtypes (``out`` and ``grad_z`` in z's dtype).

        inference: read ``z``, write ``out``, write int32 ``indices``; training: that, plus read ``grad_out``
        and ``z`` again and write ``grad_z``; decode: read ``indices``, write the codes (float32, or the
        projection's dtype after ``project_out``). With projections ``z`` is the input ``x (b, n, dim)``:
        the projection weights and the narrow ``(b, n, c * len(levels))`` codes are not counted.
        """
        values = math.prod(self.shape)
        element = self.dtype.itemsize
        indices = math.prod(self.indices_shape) * 4
        if mode == "inference":
            return 2 * values * element + indices
        if mode == "training":
            return 5 * values * element + indices
        codes_element = element if self.has_projections else 4
        return indices + values * codes_element


def workloads(size: str = "full", device_type: str = "cuda") -> list[Workload]:
    """The cases of one run: ``size`` is ``"full"``, ``"quick"`` (``--quick``) or ``"smoke"`` (``--smoke``).

    On CUDA the full run holds the issues' target workloads (up to 100M elements). On a CPU the full run is
    sized to finish in about two minutes on two cores: the same kinds of case, smaller, and the projection
    case in float32 (see :data:`CPU_PROJECTION_NOTE`). ``smoke`` is one tiny case of each kind, a check of
    the plumbing (it runs in seconds even with the kernels under Triton's interpreter), not a measurement.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, found {size!r}")
    f32, bf16 = torch.float32, torch.bfloat16
    image, video, seq = (8, 5, 5, 5, 5), (8, 8, 8, 5, 5, 5), (8, 5, 5, 5)
    cpu = device_type != "cuda"
    proj = f32 if cpu else bf16
    symmetric = (("preserve_symmetry", True),)  # vqp's symmetric grid: another calibration, the same kernel
    channel_first = (("channel_first", True),)  # a (b, d, n) sequence read through its strides
    if size == "smoke":
        return [
            Workload("image", (2, 5, 8, 8), image, f32),
            Workload("video", (1, 6, 2, 8, 8), video, bf16),
            Workload("sequence+proj", (1, 16, 32), seq, proj, dim=32),
            Workload("two-codebooks", (1, 64, 8), seq, f32, num_codebooks=2),
            Workload("image symmetric", (2, 5, 8, 8), image, f32, options=symmetric),
            Workload("channel-first sequence", (1, 4, 64), seq, f32, options=channel_first),
        ]
    if size == "quick":
        return [
            Workload("image", (64, 5, 32, 32), image, f32),
            Workload("video", (2, 6, 8, 64, 64), video, f32),
            Workload("video", (2, 6, 8, 64, 64), video, bf16),
            Workload("sequence+proj", (2, 1024, 1024), seq, proj, dim=1024),
            Workload("two-codebooks", (16, 4096, 8), seq, f32, num_codebooks=2),
            Workload("video symmetric", (2, 6, 8, 64, 64), video, f32, options=symmetric),
            Workload("channel-first sequence", (16, 4, 16384), seq, f32, options=channel_first),
        ]
    if cpu:
        return [
            Workload("image", (64, 5, 32, 32), image, f32),
            Workload("video", (4, 6, 8, 64, 64), video, f32),
            Workload("video", (4, 6, 8, 64, 64), video, bf16),
            Workload("video", (8, 6, 16, 64, 64), video, f32),
            Workload("sequence+proj", (4, 1024, 1024), seq, f32, dim=1024),
            Workload("two-codebooks", (16, 4096, 8), seq, f32, num_codebooks=2),
            Workload("video symmetric", (4, 6, 8, 64, 64), video, f32, options=symmetric),
            Workload("channel-first sequence", (16, 4, 16384), seq, f32, options=channel_first),
        ]
    return [
        Workload("image", (64, 5, 32, 32), image, f32),
        Workload("video", (8, 6, 16, 64, 64), video, f32),
        Workload("video", (8, 6, 16, 64, 64), video, bf16),
        Workload("video", (32, 6, 32, 128, 128), video, f32),
        Workload("video", (32, 6, 32, 128, 128), video, bf16),
        Workload("sequence+proj", (16, 4096, 1024), seq, bf16, dim=1024),
        Workload("two-codebooks", (16, 4096, 8), seq, f32, num_codebooks=2),
        Workload("sequence+proj", (64, 4096, 1024), seq, bf16, dim=1024),  # the workload of issue 4
        Workload("video symmetric", (8, 6, 16, 64, 64), video, f32, options=symmetric),
        Workload("video symmetric", (8, 6, 16, 64, 64), video, bf16, options=symmetric),
        Workload("channel-first sequence", (16, 4, 262144), seq, f32, options=channel_first),
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation on one workload: its module, the dtype it is fed, and its two entry points."""

    name: str
    module: nn.Module
    dtype: torch.dtype
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    decode: Callable[[torch.Tensor], torch.Tensor]
    notes: list[str] = field(default_factory=list)


def _prepared(module: nn.Module, state: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``module`` with the reference's weights, its projections in ``dtype``, on ``device``."""
    module.load_state_dict(state, strict=True)
    module.project_in.to(dtype)
    module.project_out.to(dtype)
    return module.to(device)


def build_impls(wl: Workload, device: torch.device, compiled: bool = True) -> tuple[list[Impl], list[str]]:
    """The implementations that can run ``wl`` on ``device`` (reference first), and notes on those that cannot;
    ``compiled=False``: without the ``torch.compile`` and ``fsq_triton compiled`` rows."""
    if wl.options:
        return _build_option_impls(wl, device, compiled)
    notes = []
    torch.manual_seed(0)
    reference = ReferenceFSQ(wl.levels, dim=wl.dim, num_codebooks=wl.num_codebooks)
    state = reference.state_dict()
    ref_dtype = wl.dtype
    ref_notes = []
    if wl.has_projections and wl.dtype != torch.float32:
        ref_dtype = torch.float32
        ref_notes.append(
            f"reference runs in float32: it cannot run {_dtype_name(wl.dtype)} projection weights "
            "(its project_out receives float32 codes)"
        )
    elif wl.dtype != torch.float32:
        ref_notes.append(f"reference returns float32 out for {_dtype_name(wl.dtype)} z (it promotes)")
    reference = _prepared(reference, state, ref_dtype, device)
    impls = [Impl("reference", reference, ref_dtype, reference, reference.indices_to_codes, ref_notes)]

    ours = _prepared(fsq_triton.FSQ(wl.levels, dim=wl.dim, num_codebooks=wl.num_codebooks), state, wl.dtype, device)
    impls.append(Impl("fsq_triton", ours, wl.dtype, ours, ours.indices_to_codes))

    try:
        from vector_quantize_pytorch import FSQ as VqpFSQ
    except ImportError:
        notes.append("vqp: vector-quantize-pytorch is not installed, skipped")
    else:
        try:
            vqp = VqpFSQ(list(wl.levels), dim=wl.dim, num_codebooks=wl.num_codebooks)
        except AssertionError as err:  # it refuses levels containing 2 unless preserve_symmetry
            notes.append(f"vqp: refuses levels {list(wl.levels)} ({err}), skipped")
        else:
            vqp = _prepared(vqp, state, wl.dtype, device)
            vqp_notes = []
            if wl.dtype not in (torch.float32, torch.float64):
                vqp_notes.append(f"vqp quantizes {_dtype_name(wl.dtype)} in float32 internally")
            impls.append(Impl("vqp", vqp, wl.dtype, vqp, vqp.indices_to_codes, vqp_notes))

    if device.type == "cuda" and compiled:
        torch.compiler.reset()  # a fresh cache per case: recompilations across cases would hit dynamo's limit
        impls.append(Impl(
            "torch.compile", reference, ref_dtype,
            torch.compile(reference, dynamic=False), torch.compile(reference.indices_to_codes, dynamic=False),
        ))
        # the "compiled model" row: a model holding fsq_triton.FSQ under torch.compile (its kernels seen by Inductor)
        impls.append(Impl(
            "fsq_triton compiled", ours, wl.dtype,
            torch.compile(ours, dynamic=False, fullgraph=True),
            torch.compile(ours.indices_to_codes, dynamic=False, fullgraph=True),
        ))
    return impls, notes


def _build_option_impls(wl: Workload, device: torch.device, compiled: bool = True) -> tuple[list[Impl], list[str]]:
    """A case with vqp options: vqp built with them (first: the indices are compared with its), then fsq_triton;
    the reference, which has no such options, is left out with a note."""
    options = dict(wl.options)
    notes = [f"options {options}: the reference (CogVideo) has none of them; vqp with the same options is the baseline"]
    torch.manual_seed(0)
    ours = fsq_triton.FSQ(wl.levels, dim=wl.dim, num_codebooks=wl.num_codebooks, **options)
    state = ours.state_dict()
    impls = []
    try:
        from vector_quantize_pytorch import FSQ as VqpFSQ
    except ImportError:
        notes.append("vqp: vector-quantize-pytorch is not installed, skipped")
    else:
        vqp = _prepared(VqpFSQ(list(wl.levels), dim=wl.dim, num_codebooks=wl.num_codebooks, **options), state, wl.dtype, device)
        vqp_notes = []
        if wl.dtype not in (torch.float32, torch.float64):
            vqp_notes.append(f"vqp quantizes {_dtype_name(wl.dtype)} in float32 internally")
        impls.append(Impl("vqp", vqp, wl.dtype, vqp, vqp.indices_to_codes, vqp_notes))
    ours = _prepared(ours, state, wl.dtype, device)
    impls.append(Impl("fsq_triton", ours, wl.dtype, ours, ours.indices_to_codes))
    if device.type == "cuda" and compiled:
        torch.compiler.reset()
        impls.append(Impl(
            "fsq_triton compiled", ours, wl.dtype,
            torch.compile(ours, dynamic=False, fullgraph=True),
            torch.compile(ours.indices_to_codes, dynamic=False, fullgraph=True),
        ))
    return impls, notes


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class Timer:
    """Times a callable on one device: the first call alone, warm-up calls, then repeats within a time budget."""

    def __init__(self, device: torch.device, size: str = "full"):
        self.device = device
        self.cuda = device.type == "cuda"
        # (warm-up calls, seconds of repeats per cell, fewest and most repeats) per run size
        self.warmup, self.budget_s, self.min_repeats, self.max_repeats = {
            "full": (3, 0.5, 10, 200) if self.cuda else (2, 0.3, 5, 100),
            "quick": (2, 0.2, 5, 50) if self.cuda else (1, 0.1, 3, 30),
            "smoke": (1, 0.0, 2, 2),
        }[size]
        self.flush_buffer = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall_ms(self, fn: Callable[[], object], setup: Callable[[], None]) -> tuple[float, object]:
        """One call, synchronised before and after: (milliseconds, what ``fn`` returned)."""
        setup()
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3, result

    def repeats_ms(self, fn: Callable[[], object], setup: Callable[[], None]) -> list[float]:
        """Warm-up, then per-repeat times in milliseconds (CUDA events after an L2 flush on CUDA)."""
        warm = [self.wall_ms(fn, setup)[0] for _ in range(self.warmup)]
        count = int(self.budget_s * 1e3 / max(min(warm), 1e-3))
        count = max(self.min_repeats, min(self.max_repeats, count))
        if not self.cuda:
            return [self.wall_ms(fn, setup)[0] for _ in range(count)]
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for start, end in zip(starts, ends):
            setup()
            self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        self.sync()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def copy_bandwidth_gbs(device: torch.device, quick: bool) -> float:
    """Copy bandwidth in GB/s (bytes read + written, median of repeats): a 512 MiB copy on CUDA, a 256 MiB clone on CPU."""
    repeats = 5 if quick else 20  # 20 CPU clones of 256 MiB take about 2 s on 2 cores
    if device.type == "cuda":
        src = torch.ones(2**29 // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            dst.copy_(src)
            end.record()
        torch.cuda.synchronize(device)
        seconds = statistics.median(start.elapsed_time(end) for start, end in events) / 1e3
    else:
        src = torch.ones(2**28 // 4, dtype=torch.float32)
        src.clone()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            src.clone()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


# --------------------------------------------------------------------------------------------------
# Measuring one case
# --------------------------------------------------------------------------------------------------


def make_inputs(wl: Workload, device: torch.device) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Seeded inputs of ``wl``: ``z`` in its dtype, ``grad_out`` by dtype (float32 and z's), int32 ``indices`` to decode."""
    generator = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(wl.shape, generator=generator, device=device).to(wl.dtype)
    grad_out = torch.randn(wl.shape, generator=generator, device=device)
    grads = {torch.float32: grad_out, wl.dtype: grad_out.to(wl.dtype)}
    indices = torch.randint(wl.codebook_size, wl.indices_shape, generator=generator, device=device, dtype=torch.int32)
    return z, grads, indices


def mode_step(impl: Impl, mode: str, z: torch.Tensor, grads: dict, indices: torch.Tensor):
    """(setup, fn) of one timed call of ``impl`` in ``mode``; ``fn`` returns what the call produced."""
    if mode == "training":
        leaf = z.detach().requires_grad_(True)
        params = list(impl.module.parameters())

        def setup():
            leaf.grad = None
            for p in params:
                p.grad = None

        def fn():
            out, _ = impl.forward(leaf)
            out.backward(grads[out.dtype])

        return setup, fn

    def no_setup():
        pass

    if mode == "inference":
        def fn():
            with torch.no_grad():
                return impl.forward(z)
    else:
        def fn():
            with torch.no_grad():
                return impl.decode(indices)
    return no_setup, fn


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (MemAvailable on a Linux CPU), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_shortfall(wl: Workload, device: torch.device) -> str | None:
    """Why ``wl`` would not fit in the memory free on ``device`` (``PEAK_FLOAT32_COPIES`` of z), or None if it fits."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what earlier cases left in PyTorch's cache is free for this one
    need = PEAK_FLOAT32_COPIES * 4 * math.prod(wl.shape)
    free = _available_bytes(device)
    if free is not None and need > free:
        return f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
    return None


def measure_case(wl: Workload, device: torch.device, timer: Timer, bandwidth_gbs: float, progress: tqdm,
                 compiled: bool = True) -> dict:
    """Every implementation in every mode on ``wl``: the case's entry of results.json."""
    case = {
        "name": wl.name, "label": wl.label, "shape": list(wl.shape), "levels": list(wl.levels),
        "dtype": _dtype_name(wl.dtype), "dim": wl.dim, "num_codebooks": wl.num_codebooks,
        "options": dict(wl.options), "notes": [], "skipped": None, "modes": {},
    }
    for mode in MODES:
        nbytes = wl.bytes_moved(mode)
        case["modes"][mode] = {"bytes": nbytes, "bound_ms": nbytes / (bandwidth_gbs * 1e9) * 1e3, "results": {}}

    case["skipped"] = memory_shortfall(wl, device)
    if case["skipped"]:
        return case

    impls, notes = build_impls(wl, device, compiled)
    case["notes"] += notes + [note for impl in impls for note in impl.notes]
    z, grads, indices = make_inputs(wl, device)
    reference = impls[0]
    reference_indices = None

    for impl in impls:
        impl_z = z.to(impl.dtype)
        for mode in MODES:
            progress.set_postfix_str(f"{impl.name} {mode}")
            setup, fn = mode_step(impl, mode, impl_z, grads, indices)
            entry = {"median_ms": None, "min_ms": None, "repeats": 0, "first_call_ms": None, "error": None}
            try:
                entry["first_call_ms"], result = timer.wall_ms(fn, setup)
                if mode == "inference" and impl is reference:
                    reference_indices = result[1]
                elif mode == "inference" and reference_indices is not None and impl.dtype == reference.dtype:
                    entry["index_mismatches"] = int((result[1] != reference_indices).sum())
                del result
                times = timer.repeats_ms(fn, setup)
                entry.update(median_ms=statistics.median(times), min_ms=min(times), repeats=len(times))
            except Exception as err:  # an implementation that cannot run this case is recorded, not fatal
                entry["error"] = "out of memory" if _is_out_of_memory(err) else _one_line(err)
            case["modes"][mode]["results"][impl.name] = entry
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for mode_entry in case["modes"].values():
        _add_ratios(mode_entry)
    return case


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _add_ratios(mode_entry: dict) -> None:
    """Speedup over the reference and percent of the bandwidth bound, for every timed result of one mode."""
    results = mode_entry["results"]
    reference_ms = results.get("reference", {}).get("median_ms")
    for entry in results.values():
        ms = entry["median_ms"]
        entry["speedup_vs_reference"] = reference_ms / ms if ms and reference_ms else None
        entry["percent_of_bound"] = 100 * mode_entry["bound_ms"] / ms if ms else None


# --------------------------------------------------------------------------------------------------
# Environment and outputs
# --------------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _command_line() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "fsq_triton.__main__":
        return shlex.join(["python", "-m", "fsq_triton", *sys.argv[1:]])
    return shlex.join(sys.argv)


def environment(device: torch.device, bandwidth_gbs: float) -> dict:
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fsq_triton": fsq_triton.__version__,
        "vector_quantize_pytorch": _version("vector-quantize-pytorch"),
        "copy_bandwidth_gbs": bandwidth_gbs,
        "fsq_triton_autotune": os.environ.get("FSQ_TRITON_AUTOTUNE", "0"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
    }


def _cell(entry: dict | None) -> str:
    """A table cell: ``median ms (speedup x, % of bound)``, or why there is no figure."""
    if entry is None:
        return "-"
    if entry["error"] is not None:
        return "OOM" if entry["error"] == "out of memory" else "error"
    speedup = entry["speedup_vs_reference"]
    speedup = f"{speedup:.2f}x" if speedup is not None else "-"
    return f"{entry['median_ms']:.3f} ({speedup}, {entry['percent_of_bound']:.0f}%)"


def table_rows(cases: list[dict], impls: list[str]) -> list[list[str]]:
    """Rows of the results table: case, mode, bound ms, then one cell per implementation."""
    rows = []
    for case in cases:
        for mode, mode_entry in case["modes"].items():
            if case["skipped"]:
                cells = ["skipped"] * len(impls)
            else:
                cells = [_cell(mode_entry["results"].get(name)) for name in impls]
            rows.append([case["label"], mode, f"{mode_entry['bound_ms']:.3f}", *cells])
    return rows


def first_call_rows(cases: list[dict], impls: list[str]) -> list[list[str]]:
    """Rows of the first-call table: case, mode, then each implementation's first call in ms."""
    rows = []
    for case in cases:
        if case["skipped"]:
            continue
        for mode, mode_entry in case["modes"].items():
            cells = []
            for name in impls:
                entry = mode_entry["results"].get(name)
                first = entry and entry["first_call_ms"]
                cells.append(f"{first:.1f}" if first is not None else "-")
            rows.append([case["label"], mode, *cells])
    return rows


def case_notes(cases: list[dict]) -> list[str]:
    """Per-case notes, skipped cases and errors, one line each."""
    lines = []
    for case in cases:
        for note in dict.fromkeys(case["notes"]):
            lines.append(f"{case['label']}: {note}")
        if case["skipped"]:
            lines.append(f"{case['label']}: skipped, {case['skipped']}")
        for mode, mode_entry in case["modes"].items():
            for name, entry in mode_entry["results"].items():
                if entry["error"] is not None:
                    lines.append(f"{case['label']} {mode} {name}: {entry['error']}")
                mismatches = entry.get("index_mismatches")
                if mismatches:
                    lines.append(f"{case['label']} {name}: {mismatches} index mismatches against the reference")
    return lines


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def write_markdown(path: Path, results: dict) -> None:
    env, impls = results["environment"], results["implementations"]
    header = ["case", "mode", "bound ms", *impls]
    parts = [
        "# FSQ benchmark",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}; "
        f"copy bandwidth {env['copy_bandwidth_gbs']:.1f} GB/s; {env['date']}; `{env['command']}`",
        "",
        *[f"- {note}" for note in results["notes"]],
        "",
        "Each cell: median ms (speedup over the reference, % of the bandwidth bound). "
        "`bound ms`: the bytes the case must move at the measured copy bandwidth.",
        "",
        _markdown_table(header, table_rows(results["cases"], impls)),
        "",
        "First call (ms): calibration, compilation and caches, before the timed repeats.",
        "",
        _markdown_table(["case", "mode", *impls], first_call_rows(results["cases"], impls)),
    ]
    notes = case_notes(results["cases"])
    if notes:
        parts += ["", "Notes:", "", *[f"- {line}" for line in notes]]
    path.write_text("\n".join(parts) + "\n")


def write_plot(path: Path, results: dict) -> None:
    """Two panels: speedup over the reference, and percent of the bandwidth bound, per case and mode.

    A missing bar is a result that does not exist (an error, out of memory, or an implementation not run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    impls = results["implementations"]
    groups = [(case, mode) for case in results["cases"] if not case["skipped"] for mode in MODES]
    colors = {name: f"C{k}" for k, name in enumerate(impls)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(groups) + 2), 9), sharex=True)
    for axis, key, names in (
        (top, "speedup_vs_reference", [name for name in impls if name != "reference"]),
        (bottom, "percent_of_bound", impls),
    ):
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(groups))]
            values = [(case["modes"][mode]["results"].get(name) or {}).get(key) for case, mode in groups]
            bars = [(x, v) for x, v in zip(xs, values) if v is not None]
            axis.bar([x for x, _ in bars], [v for _, v in bars], width, label=name, color=colors[name])
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    top.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    top.set_yscale("log")
    speedups = [v for bars in top.containers for v in bars.datavalues]
    if speedups:  # bars start at the bottom of the axis: keep a labelled tick below the smallest
        top.set_ylim(min(min(speedups), 1.0) / 1.5, max(max(speedups), 1.0) * 1.5)
    top.yaxis.set_major_locator(FixedLocator([m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5)]))
    top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    top.yaxis.set_minor_formatter(NullFormatter())
    top.set_ylabel("speedup over the reference")
    bottom.set_ylabel("% of the bandwidth bound")
    bottom.set_xticks(range(len(groups)), [f"{case['label']}\n{mode}" for case, mode in groups],
                      rotation=60, ha="right", fontsize=7)
    fig.suptitle(f"FSQ on {results['environment']['device']}: speedup over the eager reference, and share of the bandwidth bound")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def write_results(out: Path, env: dict, notes: list[str], cases: list[dict]) -> tuple[list[str], dict]:
    """Write results.json, results.md and results.png for the cases measured so far; (implementations, results)."""
    impls = [name for name in IMPLS if any(name in m["results"] for c in cases for m in c["modes"].values())]
    results = {"environment": env, "notes": notes, "implementations": impls, "cases": cases}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(out / "results.md", results)
    write_plot(out / "results.png", results)
    return impls, results


def run(quick: bool, device: str | None, out_dir: str, smoke: bool = False, threads: int | None = None,
        compiled: bool = True) -> int:
    """Benchmark every workload, print the table, write results.json, results.md and results.png to ``out_dir``.

    ``quick``: a few small cases; ``smoke``: one tiny case of each kind and two repeats, which checks that
    everything runs and writes its files (not a measurement). ``threads``: PyTorch's CPU threads for a CPU
    run (default :data:`CPU_THREADS`). ``compiled=False`` (``--no-compile``): no row that Inductor compiles, and
    no ResidualFSQ cases (their rows include vqp under torch.compile). Returns the exit status (2: no such device).
    """
    size = "smoke" if smoke else "quick" if quick else "full"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but CUDA is not available", file=sys.stderr)
        return 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    notes = []
    if device.type == "cpu":
        torch.set_num_threads(threads or CPU_THREADS)
        notes.append(INTERPRETER_NOTE if interpreting() else CPU_NOTE)
        notes.append(f"{torch.get_num_threads()} CPU thread(s) (--threads): {CPU_THREADS_WHY}")
        notes.append("torch.compile is timed on CUDA only")
        notes.append(CPU_PROJECTION_NOTE)
    else:
        notes.append("torch.compile: the reference under torch.compile (default mode, dynamic=False), fed as the reference")
    if size == "quick":
        notes.append("--quick: small cases, few repeats")
    elif size == "smoke":
        notes.append("--smoke: tiny cases, two repeats: a check that everything runs, not a measurement")
    if not compiled:
        notes.append(NO_COMPILE_NOTE)
    for note in notes:
        print(note)

    bandwidth = copy_bandwidth_gbs(device, quick or smoke)
    env = environment(device, bandwidth)
    print(f"{env['device']}: copy bandwidth {bandwidth:.1f} GB/s")
    timer = Timer(device, size)
    cases = []
    progress = tqdm(workloads(size, device.type), desc="cases", unit="case")
    for wl in progress:
        progress.set_description(wl.label)
        cases.append(measure_case(wl, device, timer, bandwidth, progress, compiled))
        # rewritten after every case, so that a run cut short (a time limit, a crash) leaves what it measured
        impls, results = write_results(out, env, notes, cases)
    from . import residual_cases  # here, not at the top: it imports this module

    residual = residual_cases.measure_cases(size, device, timer, bandwidth, progress) if compiled else ()
    for case in residual:  # ResidualFSQ against vqp's
        cases.append(case)
        impls, results = write_results(out, env, notes, cases)
    progress.close()

    print()
    print(_text_table(["case", "mode", "bound ms", *impls], table_rows(cases, impls)))
    print("\ncells: median ms (speedup over the reference, % of the bandwidth bound)\n")
    print(_text_table(["case", "mode", *[f"{name} first call ms" for name in impls]], first_call_rows(cases, impls)))
    print()
    for line in case_notes(cases):
        print(f"note: {line}")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0
