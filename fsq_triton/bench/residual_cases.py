"""Residual FSQ cases of the benchmark: ``fsq_triton.ResidualFSQ``/``GroupedResidualFSQ`` next to vqp's, eager and
under ``torch.compile``.

:func:`measure_cases` yields one case entry per workload, in the format of
:func:`fsq_triton.bench.harness.measure_case` (so the harness's tables, plot and results.json take them as they
are). Rows: ``fsq_triton`` (default backend), ``reference`` (vector-quantize-pytorch's module, eager: the baseline
of the speedups here) and ``torch.compile`` (vqp's module under ``torch.compile``, CUDA only). Modes as the harness:
``inference`` (``forward`` under ``no_grad``), ``training`` (forward and ``backward``), ``decode``
(``get_output_from_indices``).

Workloads (shape letters ``b`` batch, ``n`` tokens, ``e`` features):

- ``residual 8x[8,5,5,5]``: 8 stages of levels [8, 5, 5, 5] on ``(b, n, 4)`` float32, no projections: the kernel
  alone, where the bandwidth bound (read ``x``, write the quantized sum and 8 int32 indices a token) applies;
- ``residual 8x[8,5,5,5] 1024->4``: the same stages with projections ``1024 -> 4 -> 1024``, bfloat16 under
  autocast (vqp cannot run bfloat16 projection weights: its ``project_out`` receives float32);
- ``grouped ChatTTS-like``: ``GroupedResidualFSQ(dim=1024, groups=2, levels=[5, 5, 5, 5], num_quantizers=2)``
  on ``(b, n, 1024)``, bfloat16 under autocast (ChatTTS's DVAE quantizer).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

import fsq_triton

from . import harness as _harness  # the harness imports this module too: its names are read at call time

MODES = ("inference", "training", "decode")


@dataclass(frozen=True)
class ResidualWorkload:
    name: str
    shape: tuple[int, ...]           # (b, n, e)
    levels: tuple[int, ...]
    num_quantizers: int
    dtype: torch.dtype               # the input's dtype (bfloat16 cases run under autocast)
    groups: int = 0                  # 0: ResidualFSQ, else GroupedResidualFSQ with this many groups

    @property
    def label(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.shape))} {str(self.dtype).removeprefix('torch.')}"

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    @property
    def has_projections(self) -> bool:
        return self.shape[-1] != len(self.levels) * max(self.groups, 1)

    def kwargs(self) -> dict:
        base = dict(levels=list(self.levels), num_quantizers=self.num_quantizers)
        if self.groups:
            return dict(base, dim=self.shape[-1], groups=self.groups)
        return dict(base, dim=self.shape[-1])

    def bytes_moved(self, mode: str) -> int:
        """Bytes any implementation must move: inference reads ``x`` and writes the output (float32 without
        projections, as vqp, else ``x``'s dtype) and ``q`` int32 indices per token and group; training adds reading
        ``grad_out`` and ``x`` and writing ``grad_x``; decode reads the indices and writes the output."""
        values = math.prod(self.shape)
        tokens = values // self.shape[-1]
        x_bytes = values * self.dtype.itemsize
        out_bytes = values * (4 if not self.has_projections else self.dtype.itemsize)
        indices = tokens * max(self.groups, 1) * self.num_quantizers * 4
        if mode == "inference":
            return x_bytes + out_bytes + indices
        if mode == "training":
            return x_bytes + out_bytes + indices + out_bytes + x_bytes + x_bytes
        return indices + out_bytes


def workloads(size: str = "full", device_type: str = "cuda") -> list[ResidualWorkload]:
    seq, chat = (8, 5, 5, 5), (5, 5, 5, 5)
    f32, bf16 = torch.float32, torch.bfloat16
    if size == "smoke":
        shapes = [(1, 64, 4), (1, 16, 64), (1, 16, 64)]
    elif size == "quick" or device_type != "cuda":
        shapes = [(4, 16384, 4), (2, 1024, 1024), (2, 1024, 1024)]
    else:
        shapes = [(16, 1 << 20, 4), (16, 4096, 1024), (16, 4096, 1024)]
    return [
        ResidualWorkload("residual 8x[8,5,5,5]", shapes[0], seq, 8, f32),
        ResidualWorkload("residual 8x[8,5,5,5] 1024->4" if size != "smoke" else "residual 8x[8,5,5,5] proj", shapes[1], seq, 8, bf16),
        ResidualWorkload("grouped ChatTTS-like", shapes[2], chat, 2, bf16, groups=2),
    ]


def _build(wl: ResidualWorkload, device: torch.device):
    """(vqp module, fsq_triton module) with the same weights, on ``device``, or (None, ours) without vqp."""
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        vqp = None
    torch.manual_seed(0)
    cls = fsq_triton.GroupedResidualFSQ if wl.groups else fsq_triton.ResidualFSQ
    ours = cls(**wl.kwargs()).to(device)
    reference = None
    if vqp is not None:
        reference = (vqp.GroupedResidualFSQ if wl.groups else vqp.ResidualFSQ)(**wl.kwargs())
        reference.load_state_dict(ours.state_dict(), strict=True)
        reference = reference.to(device)
    return reference, ours


def _step(module_call, decode, mode: str, x: torch.Tensor, grad_out: torch.Tensor, indices, params, autocast: bool,
          device: torch.device):
    context = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
    if mode == "training":
        leaf = x.detach().requires_grad_(True)

        def setup():
            leaf.grad = None
            for p in params:
                p.grad = None

        def fn():
            with context():
                out = module_call(leaf)[0]
            out.backward(grad_out.to(out.dtype))

        return setup, fn

    def no_setup():
        pass

    if mode == "inference":
        def fn():
            with torch.no_grad(), context():
                return module_call(x)
    else:
        def fn():
            with torch.no_grad(), context():
                return decode(indices)
    return no_setup, fn


def measure_cases(size: str, device: torch.device, timer: "_harness.Timer", bandwidth_gbs: float, progress=None):
    """Yield one harness-format case entry per residual workload (see the module docstring)."""
    for wl in workloads(size, device.type):
        if progress is not None:
            progress.set_description(wl.label)
        yield measure_case(wl, device, timer, bandwidth_gbs)


def measure_case(wl: ResidualWorkload, device: torch.device, timer: "_harness.Timer", bandwidth_gbs: float) -> dict:
    case = {
        "name": wl.name, "label": wl.label, "shape": list(wl.shape), "levels": list(wl.levels),
        "dtype": str(wl.dtype).removeprefix("torch."), "dim": wl.shape[-1], "num_codebooks": 1,
        "num_quantizers": wl.num_quantizers, "groups": wl.groups,
        "notes": ["reference: vector-quantize-pytorch's module, eager (the residual cases' baseline)"],
        "skipped": None, "modes": {},
    }
    if wl.autocast:
        case["notes"].append("bfloat16 under autocast with float32 weights (vqp cannot run bfloat16 projection weights)")
    for mode in MODES:
        nbytes = wl.bytes_moved(mode)
        case["modes"][mode] = {"bytes": nbytes, "bound_ms": nbytes / (bandwidth_gbs * 1e9) * 1e3, "results": {}}
    free = _harness._available_bytes(device)
    need = 40 * 4 * math.prod(wl.shape)  # vqp's training step holds a few dozen float32 copies of x
    if free is not None and need > free:
        case["skipped"] = f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
        return case

    reference, ours = _build(wl, device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(wl.shape, generator=generator, device=device).to(wl.dtype)
    grad_out = torch.randn(wl.shape, generator=generator, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=wl.autocast):
        _, indices = ours(x)

    impls = [("fsq_triton", ours, ours.get_output_from_indices)]
    if reference is None:
        case["notes"].append("vector-quantize-pytorch is not installed: no reference rows")
    else:
        impls.insert(0, ("reference", reference, reference.get_output_from_indices))
        if device.type == "cuda":
            torch.compiler.reset()
            impls.append(("torch.compile", torch.compile(reference, dynamic=False),
                          torch.compile(reference.get_output_from_indices, dynamic=False)))

    reference_indices = None
    for name, call, decode in impls:
        params = [p for p in (reference if name != "fsq_triton" else ours).parameters()]
        for mode in MODES:
            setup, fn = _step(call, decode, mode, x, grad_out, indices, params, wl.autocast, device)
            entry = {"median_ms": None, "min_ms": None, "repeats": 0, "first_call_ms": None, "error": None}
            try:
                entry["first_call_ms"], result = timer.wall_ms(fn, setup)
                if mode == "inference":
                    if name == "reference":
                        reference_indices = result[1]
                    elif reference_indices is not None:
                        entry["index_mismatches"] = int((result[1] != reference_indices).sum())
                del result
                times = timer.repeats_ms(fn, setup)
                entry.update(median_ms=statistics.median(times), min_ms=min(times), repeats=len(times))
            except Exception as err:  # recorded, not fatal
                entry["error"] = "out of memory" if _harness._is_out_of_memory(err) else _harness._one_line(err)
            case["modes"][mode]["results"][name] = entry
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for mode_entry in case["modes"].values():
        _harness._add_ratios(mode_entry)
    return case
