"""The measuring steps a-d and v of the GPU check, each run in its own process by ``bench/gpu_check.py``.

    python bench/gpu_targets.py STEP --work DIR [--cpu]   STEP: environment, correctness, core, projections, variants

Each step writes ``DIR/<step>.json`` after every row it measures, so a step stopped by its time limit still
leaves the rows it finished. The targets (issues 2, 4, 5, 9 and 11) are judged by ``gpu_check.py``:

a. ``environment``: GPU, driver, torch, triton, the peers; the copy bandwidth (a 1 GiB device copy);
b. ``correctness``: indices and ``out`` bit for bit against the reference module run op for op on the same
   device (:class:`fsq_triton.bench.reference.ReferenceFSQ`): the 100M-element video case
   32x6x32x128x128 in float32 and bfloat16; every calibrated threshold and its float32 neighbours for odd,
   even and mixed level sets, every level 2..16 and two codebooks, channel-last and channel-first;
   projections in float32 (against the reference) and bfloat16/float16 (against fsq_triton's PyTorch path,
   the reference cannot run them); decode; gradients. Mismatch counts, never pass/fail;
c. ``core``: forward float32, forward bfloat16, forward+backward float32 on the video case: % of the copy
   bandwidth, and ratios to the reference, ``torch.compile`` of the reference, vector-quantize-pytorch, and
   fsq_triton under ``torch.compile``;
d. ``projections``: x 64x4096x1024 bfloat16, levels [8,5,5,5] (bound, vqp, reference in float32,
   forward+backward); the tiny call 64x5x32x32 against one elementwise PyTorch launch, compiled, eager and replayed from a CUDA graph;
v. ``variants``: vqp 1.32's options (issue 11: ``bound_hard_clamp``, ``preserve_symmetry``, both, ``channel_first``
   with a 3-d ``(b, d, n)`` input, ``return_indices=False``, ``orthogonal_rotation``, ``noise_dropout`` in training,
   and fsq_triton's ``track_usage``) on one input of 32x262144x4 float32 values (33.5M), levels [8,5,5,5]: index
   and output mismatches against vqp's FSQ built with the same options and state (counts), and each forward's
   time over the plain forward's, eager and replayed from a CUDA graph (the GPU's work without host time).

Timing on CUDA: ``triton.testing.do_bench`` (CUDA events, median, L2 flushed before every repeat) for the
bandwidth figures; back-to-back calls timed with events for the launch-bound tiny call. ``--cpu`` is the
plumbing check of ``gpu_check.py --cpu``: tiny shapes on CPU tensors with the kernels under Triton's
interpreter, a few wall-clock repeats, no ``torch.compile``; its figures are not measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

import fsq_triton
from fsq_triton import FSQ, level_tables
from fsq_triton.bench.reference import ReferenceFSQ

STEPS = ("environment", "correctness", "core", "projections", "variants")
VIDEO_LEVELS = (8, 8, 8, 5, 5, 5)
PROJECTION_LEVELS = (8, 5, 5, 5)
TINY_LEVELS = (8, 5, 5, 5, 5)
# step v: vqp 1.32's options (issue 11), each on one large input beside vqp's FSQ built with the same options
VARIANT_LEVELS = (8, 5, 5, 5)
NOISE_DROPOUT = 0.5  # the probability vqp 1.32 draws whatever its option says (bernoulli_'s default argument)
# (name, the options both modules take, fsq_triton's keyword-only options); the first is the plain forward, the
# baseline of every speed ratio
VARIANTS = (
    ("default", {}, {}),
    ("bound_hard_clamp", {"bound_hard_clamp": True}, {}),
    ("preserve_symmetry", {"preserve_symmetry": True}, {}),
    ("preserve_symmetry + bound_hard_clamp", {"preserve_symmetry": True, "bound_hard_clamp": True}, {}),
    ("channel_first (b, d, n)", {"channel_first": True}, {}),
    ("return_indices=False", {"return_indices": False}, {}),
    ("orthogonal_rotation", {"orthogonal_rotation": True}, {}),
    (f"noise_dropout={NOISE_DROPOUT} (training)", {"preserve_symmetry": True, "noise_dropout": NOISE_DROPOUT}, {}),
    ("track_usage", {}, {"track_usage": True}),
)
# (name, levels, num_codebooks) of the planted-threshold check: odd, even, mixed, every level 2..16, two codebooks
PLANTED_SETS = (
    ("odd", (7, 5, 5, 5, 5), 1),
    ("even", (8, 6, 4), 1),
    ("mixed", VIDEO_LEVELS, 1),
    ("levels 2-7", (2, 3, 4, 5, 6, 7), 1),
    ("levels 8-11", (8, 9, 10, 11), 1),
    ("levels 12-14", (12, 13, 14), 1),
    ("levels 15-16", (15, 16), 1),
    ("two codebooks", PROJECTION_LEVELS, 2),
)


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run: the issues' workloads on a GPU, tiny ones for the CPU plumbing check."""

    video: tuple[int, ...]        # (b, d, t, h, w), the core case
    projection: tuple[int, ...]   # x (b, n, dim) of the projection targets
    projection_check: tuple[int, ...]  # x (b, n, dim) of the projection correctness checks
    tiny: tuple[int, ...]         # the launch-bound call of issue 5
    variants: tuple[int, ...]     # z (b, n, d) of step v, d = len(VARIANT_LEVELS); channel-first: (b, d, n)
    random_tokens: int            # random tokens beside the planted ones
    copy_elements: int            # float32 elements of the bandwidth copy


GPU_SIZES = Sizes((32, 6, 32, 128, 128), (64, 4096, 1024), (8, 4096, 1024), (64, 5, 32, 32), (32, 2**18, 4), 2**20, 2**28)
CPU_SIZES = Sizes((1, 6, 2, 8, 8), (1, 16, 32), (1, 16, 32), (2, 5, 4, 4), (2, 40, 4), 64, 2**20)


class Context:
    """The device, sizes and output file of one step; :meth:`record` rewrites the step's JSON after each row."""

    def __init__(self, step: str, work: Path, cpu: bool):
        self.step, self.cpu = step, cpu
        self.device = torch.device("cpu" if cpu else "cuda")
        self.sizes = CPU_SIZES if cpu else GPU_SIZES
        self.path = work / f"{step}.json"
        self.work = work
        self.data: dict = {"rows": [], "notes": []}
        if cpu:
            self.note("CPU plumbing run: tiny shapes, kernels under Triton's interpreter; no figure here is a measurement")

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.data["notes"].append(text)
        self.save()

    def record(self, row: dict) -> dict:
        print(json.dumps(row), flush=True)
        self.data["rows"].append(row)
        self.save()
        return row

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn``: do_bench on CUDA (L2 flushed between repeats), wall clock on CPU."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=200, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def per_call_us(self, fn: Callable[[], object], calls: int = 200) -> float:
        """Microseconds per call over back-to-back calls (launch overhead included), median of rounds."""
        rounds, calls = (20, calls) if self.device.type == "cuda" else (3, 3)
        for _ in range(min(20, calls)):
            fn()
        self.sync()
        times = []
        for _ in range(rounds):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / calls)
            else:
                begin = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - begin) * 1e6 / calls)
        return statistics.median(times)

    def bandwidth_gbs(self) -> float:
        """The copy bandwidth from step a's JSON, or measured here when step a left none."""
        env_file = self.work / "environment.json"
        if env_file.is_file():
            for row in json.loads(env_file.read_text())["rows"]:
                if row.get("copy_bandwidth_gbs"):
                    return row["copy_bandwidth_gbs"]
        return copy_bandwidth_gbs(self)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def copy_bandwidth_gbs(ctx: Context) -> float:
    """Bytes read + written per second by a device copy of ``copy_elements`` float32, in GB/s."""
    src = torch.randn(ctx.sizes.copy_elements, device=ctx.device)
    dst = torch.empty_like(src)
    ms = ctx.median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def bit_mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Values whose bit patterns differ (NaN against NaN counts as equal); integers compared by value."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if not a.is_floating_point():
        return int((a != b).sum())
    b = b.to(a.dtype)
    view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype, torch.int16)
    differ = a.contiguous().view(view) != b.contiguous().view(view)
    return int((differ & ~(a.isnan() & b.isnan())).sum())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the 2-norm, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def numel(shape) -> int:
    return math.prod(shape)


def seeded(shape, ctx: Context, scale: float = 2.0, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device=ctx.device).manual_seed(seed)
    return (torch.randn(shape, generator=generator, device=ctx.device) * scale).to(dtype)


def vqp_class():
    """vector_quantize_pytorch.FSQ, or None with the reason (the GPU machines get it from .gpu-wheels/)."""
    try:
        from vector_quantize_pytorch import FSQ as VqpFSQ
    except ImportError as err:
        return None, f"vector-quantize-pytorch is not importable here ({err}): no vqp rows"
    return VqpFSQ, None


def cuda_graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, as torch.cuda.graphs asks); returns
    the graph's ``replay``: the same kernels on the same buffers, with no Python or launch work a call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def compiled(module_or_fn, ctx: Context, **kwargs):
    """``torch.compile`` of it on CUDA; None on the CPU plumbing run (compiling there takes minutes)."""
    if ctx.cpu:
        return None
    return torch.compile(module_or_fn, dynamic=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# a. environment
# --------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def step_environment(ctx: Context) -> None:
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "fsq_triton": fsq_triton.__version__, "fsq_triton_path": str(Path(fsq_triton.__file__).parent),
        "numpy": _version("numpy"), "vector_quantize_pytorch": _version("vector-quantize-pytorch"),
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(device=props.name, memory_gb=round(props.total_memory / 1e9, 1),
                   capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    else:
        env["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} threads)"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = (query.stdout or query.stderr).strip()
    else:
        env["nvidia_smi"] = "nvidia-smi not found"
    ctx.record(env)
    ctx.record({"copy_bandwidth_gbs": copy_bandwidth_gbs(ctx), "copy_bytes": 2 * 4 * ctx.sizes.copy_elements})


# --------------------------------------------------------------------------------------------------
# b. correctness
# --------------------------------------------------------------------------------------------------


def planted_tokens(levels, num_codebooks: int, ctx: Context) -> torch.Tensor:
    """``(tokens, c*d)`` float32: random values, and in each channel every calibrated threshold of its level
    with its float32 neighbours (one and two ulps below, one above), at random token positions."""
    d = len(levels)
    thresholds = level_tables(tuple(levels), ctx.device).thresholds.float().cpu()
    generator = torch.Generator().manual_seed(1)
    values = []
    for j in range(d):
        thr = thresholds[j][thresholds[j].isfinite()]
        down = torch.nextafter(thr, torch.tensor(-math.inf))
        values.append(torch.cat([thr, down, torch.nextafter(thr, torch.tensor(math.inf)),
                                 torch.nextafter(down, torch.tensor(-math.inf))]))
    tokens = max(len(v) for v in values) + ctx.sizes.random_tokens
    z = torch.randn(tokens, num_codebooks * d, generator=generator) * 2
    for c in range(num_codebooks):
        for j, v in enumerate(values):
            z[torch.randperm(tokens, generator=generator)[: len(v)], c * d + j] = v
    return z.to(ctx.device)


def guarded(check, *args) -> dict:
    """``check(*args)``, or ``{"error": ...}`` when it raises: one check that cannot run must not hide the others."""
    try:
        return check(*args)
    except Exception as err:  # noqa: BLE001 - recorded in the row, counted against the target
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}


def forward_mismatches(ours: FSQ, reference, z: torch.Tensor, out_dtype=None) -> dict:
    with torch.no_grad():
        out, indices = ours(z)
        ref_out, ref_indices = reference(z)
    ref_out = ref_out.to(out_dtype or out.dtype)
    return {"index_mismatches": bit_mismatches(indices, ref_indices), "output_mismatches": bit_mismatches(out, ref_out),
            "values": out.numel(), "tokens": indices.numel(), "max_abs_diff": max_abs_diff(out, ref_out)}


def step_correctness(ctx: Context) -> None:
    dev = ctx.device
    # 1. the video case, both dtypes, against the reference module op for op on the same device
    ours, reference = FSQ(VIDEO_LEVELS).to(dev), ReferenceFSQ(VIDEO_LEVELS).to(dev)
    shape = "x".join(map(str, ctx.sizes.video))
    for dtype in (torch.float32, torch.bfloat16):
        z = seeded(ctx.sizes.video, ctx, dtype=dtype)
        row = guarded(forward_mismatches, ours, reference, z)
        ctx.record({"check": f"video {shape} {str(dtype)[6:]} forward vs reference", "target": "0 and 0", **row})
        if dtype == torch.float32:
            with torch.no_grad():
                indices = reference(z)[1]
                codes, ref_codes = ours.indices_to_codes(indices), reference.indices_to_codes(indices)
            ctx.record({"check": f"video {shape} float32 decode vs reference",
                        "output_mismatches": bit_mismatches(codes, ref_codes), "values": codes.numel()})
            del indices, codes, ref_codes
            # gradients: fsq_triton's kernel backward against the reference's autograd
            z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
            grad_out = seeded(ctx.sizes.video, ctx, scale=1.0, seed=2)
            ours(z1)[0].backward(grad_out)
            reference(z2)[0].backward(grad_out)
            diff = (z1.grad - z2.grad).abs()
            ctx.record({"check": f"video {shape} float32 grad_z vs reference", "max_abs_diff": float(diff.max()),
                        "beyond_1e-5": int((diff > 1e-5).sum()), "values": diff.numel()})
            del z1, z2, grad_out, diff
        del z
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # 2. every calibrated threshold and its neighbours, channel-last (b, n, c*d) and channel-first (b, c*d, 1, n)
    for name, levels, c in PLANTED_SETS:
        label = f"planted thresholds {name} {list(levels)} x{c}"
        try:
            ours = FSQ(levels, num_codebooks=c).to(dev)
        except ValueError as err:  # levels that fsq_triton refuses on purpose: said, not counted
            for layout in ("channel-last", "channel-first"):
                ctx.record({"check": f"{label} {layout}", "target": "0 and 0", "skipped": f"FSQ refuses them: {err}"})
            continue
        reference = ReferenceFSQ(levels, num_codebooks=c).to(dev)
        tokens = planted_tokens(levels, c, ctx)
        for layout, z in (("channel-last", tokens[None]), ("channel-first", tokens.t()[None, :, None, :])):
            ctx.record({"check": f"{label} {layout}", "target": "0 and 0", **guarded(forward_mismatches, ours, reference, z)})

    # 3. projections: float32 against the reference; bfloat16 and float16 against fsq_triton's PyTorch path
    b, n, dim = ctx.sizes.projection_check
    torch.manual_seed(0)
    reference = ReferenceFSQ(PROJECTION_LEVELS, dim=dim).to(dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        label = "reference" if dtype == torch.float32 else "fsq_triton's PyTorch path"
        row = guarded(projection_check, ctx, reference, dtype, (b, n, dim))
        ctx.record({"check": f"projections x {b}x{n}x{dim} {str(dtype)[6:]} vs {label}",
                    "note": "index mismatches here come from products summed in another order near a threshold; "
                            "counted, not a bitwise target", **row})
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def projection_check(ctx: Context, reference, dtype: torch.dtype, shape) -> dict:
    """fsq_triton with projections in ``dtype`` against the reference (float32) or its own PyTorch path (half
    precision, which the reference cannot run): forward mismatches, decode, and the gradients of x and the weights."""
    dim = shape[-1]
    ours = FSQ(PROJECTION_LEVELS, dim=dim)
    oracle = FSQ(PROJECTION_LEVELS, dim=dim, backend="torch")
    for module in (ours, oracle):
        module.load_state_dict(reference.state_dict())
    ours, oracle = ours.to(ctx.device, dtype), oracle.to(ctx.device, dtype)
    against = reference if dtype == torch.float32 else oracle
    x = seeded(shape, ctx, scale=1.0, dtype=dtype, seed=3)
    row = forward_mismatches(ours, against, x)
    with torch.no_grad():
        indices = against(x)[1]
        codes, ref_codes = ours.indices_to_codes(indices), against.indices_to_codes(indices)
    row["decode_max_abs_diff"] = max_abs_diff(codes, ref_codes.to(codes.dtype))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad_out = seeded(shape, ctx, scale=1.0, dtype=dtype, seed=4)
    ours(x1)[0].backward(grad_out)
    out2 = against(x2)[0]
    out2.backward(grad_out.to(out2.dtype))
    params = dict(against.named_parameters())
    row["grad_relative_error"] = {"x": relative_error(x1.grad, x2.grad)} | {
        name: relative_error(p.grad, params[name].grad) for name, p in ours.named_parameters()}
    return row


# --------------------------------------------------------------------------------------------------
# c. core speed
# --------------------------------------------------------------------------------------------------


def step_core(ctx: Context) -> None:
    dev, shape = ctx.device, ctx.sizes.video
    bandwidth = ctx.bandwidth_gbs()
    n, tokens = numel(shape), numel(shape) // shape[1]
    ours, reference = FSQ(VIDEO_LEVELS).to(dev), ReferenceFSQ(VIDEO_LEVELS).to(dev)
    VqpFSQ, why = vqp_class()
    vqp = VqpFSQ(list(VIDEO_LEVELS)).to(dev) if VqpFSQ else None
    if why:
        ctx.note(why)
    if ctx.cpu:
        ctx.note("torch.compile rows are timed on CUDA only (compiling on the CPU run would take minutes)")
    torch.compiler.reset()
    impls = {"fsq_triton": ours, "reference": reference, "vqp": vqp,
             "torch_compile_reference": compiled(reference, ctx), "fsq_triton_compiled": compiled(ours, ctx, fullgraph=True)}
    label = "x".join(map(str, shape))
    for dtype, target in ((torch.float32, 90), (torch.bfloat16, 85)):
        z = seeded(shape, ctx, dtype=dtype)
        row = {"case": f"video {label} {str(dtype)[6:]} forward", "target_pct_of_bound": target,
               "bytes": 2 * n * z.element_size() + 4 * tokens}
        with torch.no_grad():
            for name, impl in impls.items():
                if impl is not None:
                    row[f"{name}_ms"] = ctx.median_ms(lambda impl=impl: impl(z))
        ctx.record(_ratios(row, bandwidth))
        del z

    z = seeded(shape, ctx).requires_grad_(True)
    grad_out = seeded(shape, ctx, scale=1.0, seed=2)
    row = {"case": f"video {label} float32 forward+backward", "target_pct_of_bound": 85,
           # forward: read z, write out and indices; backward: read grad_out and z, write grad_z
           "bytes": 5 * n * 4 + 4 * tokens}
    for name, impl in impls.items():
        if impl is not None:
            def step(impl=impl):
                z.grad = None
                impl(z)[0].backward(grad_out)
            row[f"{name}_ms"] = ctx.median_ms(step)
    ctx.record(_ratios(row, bandwidth))


def _ratios(row: dict, bandwidth: float) -> dict:
    """Add the bound, % of the bound and each implementation's time over fsq_triton's (above 1: fsq_triton faster)."""
    row["copy_bandwidth_gbs"] = bandwidth
    row["bound_ms"] = row["bytes"] / (bandwidth * 1e9) * 1e3
    ours = row["fsq_triton_ms"]
    row["pct_of_bound"] = 100 * row["bound_ms"] / ours
    for key in [k for k in row if k.endswith("_ms") and k not in ("fsq_triton_ms", "bound_ms")]:
        row["x_" + key.removesuffix("_ms")] = row[key] / ours
    return row


# --------------------------------------------------------------------------------------------------
# d. projections, the tiny call, compiled against eager
# --------------------------------------------------------------------------------------------------


def step_projections(ctx: Context) -> None:
    dev = ctx.device
    b, n, dim = ctx.sizes.projection
    dtype = torch.bfloat16
    bandwidth = ctx.bandwidth_gbs()
    torch.manual_seed(0)
    reference = ReferenceFSQ(PROJECTION_LEVELS, dim=dim).to(dev)
    ours = FSQ(PROJECTION_LEVELS, dim=dim)
    ours.load_state_dict(reference.state_dict())
    ours = ours.to(dev, dtype)
    x = seeded((b, n, dim), ctx, scale=1.0, dtype=dtype)
    grad_out = seeded((b, n, dim), ctx, scale=1.0, dtype=dtype, seed=2)
    row = {"case": f"projections x {b}x{n}x{dim} bfloat16, levels {list(PROJECTION_LEVELS)}",
           "bytes": 2 * x.numel() * 2 + 4 * b * n}
    with torch.no_grad():
        row["fsq_triton_ms"] = ctx.median_ms(lambda: ours(x))
        x32 = x.float()
        row["reference_float32_ms"] = ctx.median_ms(lambda: reference(x32))
        x32 = None
    xg = x.clone().requires_grad_(True)

    def train(module):
        def step():
            xg.grad = None
            module(xg)[0].backward(grad_out)
        return step

    row["fsq_triton_fwd_bwd_ms"] = ctx.median_ms(train(ours))
    VqpFSQ, why = vqp_class()
    if VqpFSQ is None:
        row["vqp"] = why
    else:
        vqp = VqpFSQ(list(PROJECTION_LEVELS), dim=dim)
        vqp.load_state_dict(reference.state_dict())
        vqp = vqp.to(dev, dtype)
        with torch.no_grad():
            row["vqp_ms"] = ctx.median_ms(lambda: vqp(x))
        row["vqp_fwd_bwd_ms"] = ctx.median_ms(train(vqp))
        row["speedup_vs_vqp"] = row["vqp_ms"] / row["fsq_triton_ms"]
        row["fwd_bwd_speedup_vs_vqp"] = row["vqp_fwd_bwd_ms"] / row["fsq_triton_fwd_bwd_ms"]
    row["copy_bandwidth_gbs"] = bandwidth
    row["bound_ms"] = row["bytes"] / (bandwidth * 1e9) * 1e3
    row["x_bound"] = row["fsq_triton_ms"] / row["bound_ms"]
    row["speedup_vs_reference_float32"] = row["reference_float32_ms"] / row["fsq_triton_ms"]
    ctx.record(row)
    x = xg = grad_out = None  # free 1.5 GB before the tiny call (the timing closures hold these names)
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # the tiny call: launch-bound, so per-call time over back-to-back calls
    fsq, reference = FSQ(TINY_LEVELS).to(dev), ReferenceFSQ(TINY_LEVELS).to(dev)
    z = seeded(ctx.sizes.tiny, ctx)
    torch.compiler.reset()
    fsq_compiled, reference_compiled = compiled(fsq, ctx, fullgraph=True), compiled(reference, ctx)
    if ctx.cpu:
        ctx.note("the compiled rows of the tiny call are timed on CUDA only")
    with torch.no_grad():
        row = {"case": f"tiny call {'x'.join(map(str, ctx.sizes.tiny))} forward, us per call back to back",
               "elementwise_launch_us": ctx.per_call_us(lambda: torch.add(z, 1.0)),
               "fsq_triton_us": ctx.per_call_us(lambda: fsq(z)),
               "reference_us": ctx.per_call_us(lambda: reference(z))}
        if fsq_compiled is not None:
            row["fsq_triton_compiled_us"] = ctx.per_call_us(lambda: fsq_compiled(z))
            row["torch_compile_reference_us"] = ctx.per_call_us(lambda: reference_compiled(z))
        if dev.type == "cuda":  # the launch cost a captured call pays: one CUDA graph replay a call
            for name, fn in (("fsq_triton", lambda: fsq(z)), ("reference", lambda: reference(z))):
                try:
                    row[f"{name}_cuda_graph_us"] = ctx.per_call_us(cuda_graph_replay(fn))
                except Exception as exc:  # noqa: BLE001 - a capture that fails is reported, not fatal
                    row[f"{name}_cuda_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            ctx.note("the CUDA-graph rows of the tiny call are timed on CUDA only")
    row["x_elementwise_launch"] = row["fsq_triton_us"] / row["elementwise_launch_us"]
    if "fsq_triton_cuda_graph_us" in row:
        row["cuda_graph_x_elementwise_launch"] = row["fsq_triton_cuda_graph_us"] / row["elementwise_launch_us"]
    ctx.record(row)


# --------------------------------------------------------------------------------------------------
# v. vqp 1.32's options (issue 11): parity with vqp on a large input, speed against the plain forward
# --------------------------------------------------------------------------------------------------


def _options(options: dict, keywords: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in {**options, **keywords}.items()) or "-"


def _error(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _variant_parity(ours: FSQ, vqp, x: torch.Tensor, training: bool, keywords: dict) -> dict:
    """One forward of ``ours`` against ``vqp`` (same options and state; None: vqp absent) on ``x``: index and output
    mismatches; in training (noise dropout) the indices against vqp's and against ``ours`` without noise, and the
    share of values the noise moved; with ``track_usage`` one forward's counts against a bincount of its indices."""
    row: dict = {}
    with torch.no_grad():
        out, indices = ours(x)
        if vqp is not None:
            ref_out, ref_indices = vqp(x)
            if indices is not None or ref_indices is not None:
                row["index_mismatches"] = bit_mismatches(indices, ref_indices)
            if not training and ours.orthogonal_rotation:
                # by design: the kernel sums codes @ R.T in its own order (README), so out is vqp's to float32
                # rounding; a mismatch is a value beyond that (1e-6 for codes in [-1, 1]), the bit differences a note
                row["output_mismatches"] = int(((out.float() - ref_out.float()).abs() > 1e-6).sum())
                row["output_bit_differences"] = bit_mismatches(out, ref_out.to(out.dtype))
                row["max_abs_diff"] = max_abs_diff(out, ref_out)
            elif not training:  # noisy outputs are not compared (vqp draws with probability 0.5 whatever p is)
                row["output_mismatches"] = bit_mismatches(out, ref_out.to(out.dtype))
                row["max_abs_diff"] = max_abs_diff(out, ref_out)
            del ref_out, ref_indices
        if indices is None:
            row["indices"] = "none (return_indices=False)"
        if training:  # the noise must leave the indices as they are without it
            quiet_out, quiet_indices = ours.eval()(x)
            ours.train()
            row["index_mismatches_vs_no_noise"] = bit_mismatches(indices, quiet_indices)
            row["noised_fraction"] = bit_mismatches(out, quiet_out) / out.numel()
            row["note"] = ("training mode: outputs are noisy, not compared; noised_fraction is the share of values "
                           f"the noise moved (p = {ours.noise_dropout}, less the codes clamped back at +-1)")
        if keywords.get("track_usage"):
            ours.reset_usage()
            _, counted = ours(x)
            expected = torch.bincount(counted.reshape(-1).long(), minlength=ours.codebook_size)
            row["usage_count_mismatches"] = int((ours.usage_counts[0] != expected).sum())
            row["usage_counted"] = int(ours.usage_counts.sum())
    return row


def step_variants(ctx: Context) -> None:
    """Each of :data:`VARIANTS` on one input of ``ctx.sizes.variants`` float32 values: fsq_triton's FSQ and vqp's,
    built with the same options (vqp's ``state_dict`` loaded into fsq_triton's, so both rotate with the same ``R``),
    index and output mismatches counted (never judged here), and fsq_triton's forward timed as a ratio to the
    plain (default) forward of the same input. ``noise_dropout`` runs in training mode: its outputs are noisy (and
    vqp draws with probability 0.5 whatever the option says), so only its indices are compared, against vqp's and
    against the same module's forward without noise. ``track_usage``: the counts of one forward against a
    bincount of its indices, and the forward's cost over the plain one in %. Without vqp: the speed rows alone."""
    dev = ctx.device
    b, n, d = ctx.sizes.variants
    # what the step will measure, so that the summary names the variants a cut run did not reach
    ctx.data["planned"] = [{"variant": name, "speed": "baseline" if i == 0 else "overhead_pct" if keywords.get("track_usage")
                            else "x_plain"} for i, (name, _, keywords) in enumerate(VARIANTS)]
    VqpFSQ, why = vqp_class()
    if why:
        ctx.note(why)
    z = seeded((b, n, d), ctx)                  # (b, n, d): vqp's sequence layout
    z_cf = z.transpose(1, 2).contiguous()        # (b, d, n): the same values, channel-first
    shape = "x".join(map(str, (b, n, d)))
    bandwidth = ctx.bandwidth_gbs()
    plain_ms = plain_graph_ms = None
    if dev.type != "cuda":
        ctx.note("the CUDA-graph replays (each variant's GPU work without host time) are timed on CUDA only")
    for name, options, keywords in VARIANTS:
        channel_first, training = options.get("channel_first", False), options.get("noise_dropout", 0) > 0
        x = z_cf if channel_first else z
        row = {"variant": name, "options": _options(options, keywords),
               "input": f"{'x'.join(map(str, x.shape))} float32 {'(b, d, n)' if channel_first else '(b, n, d)'}",
               "values": x.numel(), "tokens": b * n}
        try:
            torch.manual_seed(0)
            vqp = VqpFSQ(list(VARIANT_LEVELS), **options) if VqpFSQ else None
            ours = FSQ(VARIANT_LEVELS, **options, **keywords)
            if vqp is not None:  # the same state (the rotation buffer R) in both
                ours.load_state_dict(vqp.state_dict())
                vqp = vqp.to(dev).train(training)
            ours = ours.to(dev).train(training)
        except Exception as err:  # noqa: BLE001 - one variant that cannot run must not hide the others
            row["error"] = _error(err)
            ctx.record(row)
            continue
        if vqp is None:
            row["vqp"] = why
        try:
            row.update(_variant_parity(ours, vqp, x, training, keywords))
        except Exception as err:  # noqa: BLE001 - counted against the parity targets; the speed is still timed
            row["error"] = _error(err)
        try:
            with torch.no_grad():
                row["fsq_triton_ms"] = ctx.median_ms(lambda: ours(x))
                if dev.type == "cuda":  # the GPU's work alone: the call replayed from a CUDA graph, no host time
                    try:
                        row["cuda_graph_ms"] = ctx.median_ms(cuda_graph_replay(lambda: ours(x)))
                    except Exception as exc:  # noqa: BLE001 - a capture that fails is reported, not fatal
                        row["cuda_graph_error"] = _error(exc)
            if name == VARIANTS[0][0]:  # the plain forward: the baseline, and its place against the copy bandwidth
                plain_ms, plain_graph_ms = row["fsq_triton_ms"], row.get("cuda_graph_ms")
                row["bytes"] = 2 * x.numel() * 4 + 4 * b * n
                row["bound_ms"] = row["bytes"] / (bandwidth * 1e9) * 1e3
                row["pct_of_bound"] = 100 * row["bound_ms"] / plain_ms
            if plain_ms is None:
                row["no_ratio"] = "the plain forward did not run (see its row)"
            else:
                row["plain_ms"] = plain_ms
                row["x_plain"] = row["fsq_triton_ms"] / plain_ms
                if keywords.get("track_usage"):
                    row["overhead_pct"] = 100 * (row["x_plain"] - 1)
            if row.get("cuda_graph_ms") and plain_graph_ms:
                row["cuda_graph_x_plain"] = row["cuda_graph_ms"] / plain_graph_ms
        except Exception as err:  # noqa: BLE001 - said in the row and its speed target
            row["speed_error"] = _error(err)
        ctx.record(row)
        ours = vqp = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if ctx.cpu:
        ctx.note(f"CPU check: {shape} values; on the GPU the step runs {'x'.join(map(str, GPU_SIZES.variants))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--work", required=True, help="folder for <step>.json")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU tensors (plumbing check, no GPU)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_targets.py {args.step}: no CUDA GPU here (use --cpu for the plumbing check)", file=sys.stderr)
        return 2
    ctx = Context(args.step, Path(args.work), args.cpu)
    ctx.save()
    {"environment": step_environment, "correctness": step_correctness, "core": step_core,
     "projections": step_projections, "variants": step_variants}[args.step](ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
