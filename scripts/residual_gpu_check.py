"""The residual FSQ GPU check: index parity with vqp and the issue's speed targets, as JSON lines.

    python scripts/residual_gpu_check.py                      # on a CUDA machine with vector-quantize-pytorch
    python scripts/residual_gpu_check.py --elements 100000000 --out residual.json   # more elements, the report in a file
    python scripts/residual_gpu_check.py --cases projected,grouped   # the two cases with projections alone (about 55 s)
    python scripts/residual_gpu_check.py --elements 65536 --device cpu   # a dry run of the plumbing (64 tokens a case)

Three cases (issue 12), each against vector-quantize-pytorch (vqp) 1.32's module of the same class, loaded with
fsq_triton's ``state_dict`` (``strict=True``) and given the same input:

- ``dim4``: ``ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=8)`` on ``(1, n, 4)`` float32, no projections;
- ``projected``: ``ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=8, dim=1024)``, projections 1024 -> 4 -> 1024, on
  ``(1, n, 1024)`` bfloat16, every call under ``torch.autocast(device, dtype=torch.bfloat16)`` with float32 weights
  (vqp cannot run bfloat16 projection weights: its ``project_out`` receives the float32 sum of its stages);
- ``grouped``: the ChatTTS-like ``GroupedResidualFSQ(dim=1024, groups=2, levels=[5, 5, 5, 5], num_quantizers=2)``,
  input and autocast as ``projected``.

Each result is printed as soon as it is measured, one JSON object a line, flushed: ``{"environment": ...}``, then
``{"parity": ...}`` for each semantics of ``dim4``, then ``{"speed": ...}`` after each of its implementations is timed
(each line holds every row timed so far and the ratios they allow, so the last one is the whole speed result), then
``{"projected": ...}`` and ``{"grouped": ...}``, each line the whole case so far (``parity``, then ``speed`` after each
row, the last line the most complete). Every value carries ``at_s``, the seconds since the script started when it
was printed (where the time goes). A run cut short (the GPU check's time limit) keeps the lines it printed.
``--out FILE`` also rewrites the assembled report there (one indented JSON object: the environment's keys,
``parity``, ``speed``, ``projected``, ``grouped``) after each line.

Order, so that a cut loses the least: ``dim4`` whole (its parity, fsq_triton, vqp eager, then ``torch.compile`` of
vqp: the judged targets of the GPU check), then ``projected`` and ``grouped`` (parity, fsq_triton, vqp eager), then
the ``torch.compile`` rows of ``projected`` and ``grouped`` (Inductor's compiles, about 17 s a case: the slowest to
set up, last). ``--compile-cases`` chooses whose ``torch.compile`` rows are timed (the GPU check's step r: ``dim4``
only, to stay within its limit; see bench/NOTES.md).

The default of 20M elements for ``dim4`` finished in under 75 s on an H200 (torch 2.11, triton 3.6, 2026-11-28),
Python's start and the compiles included; 100M did not finish in the GPU check's 45 s. ``torch.compile`` of vqp is
timed last, so a cut loses that row first.

For each semantics of ``dim4`` (``current`` against the installed vqp, which must be >= 1.26; ``pre-1.26`` only
counts fsq_triton's kernel against its own torch path, which replays vqp 1.25.2's ops):

- ``index_mismatches``: indices of the fused kernel (the soft clamp where ``ResidualFSQ.soft_clamp_in_kernel``'s
  default puts it: in the kernel where the device's ``tanh`` check passes, ``soft_clamp_in_kernel_by_default``) that
  differ from vqp's over ``--elements`` (default 20M) float32 inputs (``randn * 1.5``, in chunks), plus the largest
  difference of the quantized output; and the same count with the soft clamp forced into the kernel
  (``soft_clamp_in_kernel = True``: ``..._soft_clamp_in_kernel``) and into torch ops (``False``:
  ``..._soft_clamp_in_torch``); ``tanh_probe_mismatches`` and ``soft_clamp_probe_mismatches``: the values of the
  module's check (``ops.residual.tanh_mismatches``, 4.5M floats: every 1021st bit pattern and the neighbourhoods of
  tanhf's branch points; ``soft_clamp_mismatches``, the whole soft clamp over those values and the same times each
  ``c``) where the kernels' ``tanh`` or soft clamp and torch's differ in a bit (current semantics only);
- ``grad_max_abs_diff``: the input gradient against autograd through vqp, on the first chunk;
- timings (median of CUDA-event repeats after an L2 flush) of forward and forward+backward for fsq_triton, vqp eager and
  ``torch.compile`` of vqp, and the bandwidth bound of one forward pass (read ``x``, write the quantized sum and the
  8 int32 indices per token) at the measured copy bandwidth;
- ``compiled_parity`` (after the compiled row, on the timed input): index mismatches of compiled vqp against eager
  vqp, and of fsq_triton with the soft clamp in the kernel and in torch ops against each (Inductor's ``tanh`` is
  libdevice's, as the kernel's: whether the torch-op soft clamp's extra pass over ``x`` buys more than parity with
  eager vqp).

For ``projected`` and ``grouped``, on ``--tokens`` tokens (default 2**17 on CUDA: ``x`` is 128M bfloat16 values,
256 MiB, about 5x an H200's L2, so the two 1024-feature GEMMs that bound the forward stream from memory; the forward
bound is about 0.13 ms at 4.2 TB/s; vqp's training step holds a few copies of ``x``, under 2 GB; an eager call's host
time may still show at this size, ``--tokens 262144`` doubles the GPU work; 64 tokens on the CPU):

- ``parity``: one forward of each module in eval mode under ``no_grad`` and autocast, same input:
  ``index_mismatches`` over ``indices`` (``(1, n, 8)``, resp. ``(2, 1, n, 2)``), the largest absolute difference of
  the quantized output (``quantized_max_abs_diff``, in float32) and the count of its values that differ
  (``quantized_mismatches``);
- ``speed``: forward (eval mode, ``no_grad``) and forward+backward (training mode, ``backward`` of a bfloat16
  gradient, parameter gradients cleared each call) of fsq_triton, vqp eager and ``torch.compile`` of vqp, all
  under autocast, and the bound of one forward pass: read ``x``, write the output in ``x``'s dtype and 8 (resp. 2 a
  group, 4 a token) int32 indices per token, at the measured copy bandwidth; and ``project_in`` alone (``speed.
  project_in``: the ``nn.Linear`` left outside the kernel for exact indices, timed under the same autocast beside its
  own bound, read ``x`` and write ``h``), what fusing it could at most save.

``--fuse-project-in`` adds, to the projected and grouped cases, ``ResidualFSQ.fuse_project_in`` (opt-in:
``project_in`` in the kernel too): its index mismatches against vqp (``parity.fuse_project_in``; not 0 by design,
the count says how far) and its timed row (``fsq_triton fuse_project_in``).

Targets (issue 12), on ``dim4``: forward within 1.3x of the bound, >= 10x vqp eager and >= 3x its torch.compile,
forward+backward >= 5x vqp, 0 index mismatches (or the count and why). The same ratios are computed for the
other two cases.
"""

from __future__ import annotations

import time

START = time.monotonic()  # before the imports: ``at_s`` counts Python's start of torch too

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fsq_triton  # noqa: E402

LEVELS, STAGES = [8, 5, 5, 5], 8
CASES = ("dim4", "projected", "grouped")
DEFAULT_TOKENS = {"cuda": 1 << 17, "cpu": 64}  # the cases with projections (see the docstring)


def _time_ms(fn, device, repeats=20, warmup=3):
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    for _ in range(min(warmup, repeats)):
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
    result = {"semantics": semantics, "elements": tokens * len(LEVELS), "index_mismatches": mismatches,
              "index_mismatches_soft_clamp_in_kernel": forced[True],
              "index_mismatches_soft_clamp_in_torch": forced[False],
              "quantized_max_abs_diff": max_diff, "grad_max_abs_diff": grad_diff}
    ops = ours._triton_ops(x)
    if semantics == "current" and ops is not None:
        probe = {} if device.type == "cuda" else {"stride": (1 << 22) + 1, "window": 8}  # the CPU: a dry run
        result.update(tanh_probe_values=ops.tanh_probe_values("cpu", **probe).numel(),
                      tanh_probe_mismatches=ops.tanh_mismatches(device, **probe),
                      soft_clamp_probe_mismatches=sum(ops.soft_clamp_mismatches(device, c, ops.SOFT_DIVIDE, **probe)
                                                      for c in sorted(set(ours._soft_clamp_key))),
                      soft_clamp_in_kernel_by_default=ours._soft_clamp_runs_in_kernel(device))
    return result


def time_rows(result: dict, rows: dict, x: torch.Tensor, grad: torch.Tensor, device, autocast: bool = False,
              repeats: int = 20, on_row: Callable[[dict], None] | None = None) -> dict:
    """Time forward (eval mode, ``no_grad``) and forward+backward (training mode) of each module of ``rows``
    (name -> module) on ``x``, into ``result["rows"]``, with the ratios the rows so far allow (over
    ``result["forward_bound_ms"]``, fsq_triton against ``vqp eager`` and ``vqp torch.compile``); ``on_row(result)``
    after each row."""
    out = result.setdefault("rows", {})

    def context():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    for name, module in rows.items():
        def forward():
            with torch.no_grad(), context():
                module(x)

        leaf = x.detach().clone().requires_grad_(True)

        def training():
            leaf.grad = None
            module.zero_grad(set_to_none=True)
            with context():
                quantized = module(leaf)[0]
            quantized.backward(grad.to(quantized.dtype))

        module.eval()
        forward_ms = _time_ms(forward, device, repeats)
        module.train()
        out[name] = {"forward_ms": forward_ms, "forward_backward_ms": _time_ms(training, device, repeats)}
        if "fsq_triton" in out:
            ours_ms = out["fsq_triton"]
            result["forward_over_bound"] = ours_ms["forward_ms"] / result["forward_bound_ms"]
            for other in ("vqp eager", "vqp torch.compile"):
                if other in out:
                    result[f"forward_speedup_vs_{other}"] = out[other]["forward_ms"] / ours_ms["forward_ms"]
                    result[f"forward_backward_speedup_vs_{other}"] = (out[other]["forward_backward_ms"]
                                                                      / ours_ms["forward_backward_ms"])
        if on_row is not None:
            on_row(result)
    return result


def speed(elements: int, device, vqp, bandwidth_gbs: float, on_row: Callable[[dict], None] | None = None,
          repeats: int = 20, compile_rows: bool = True):
    """``dim4``'s timings of fsq_triton, vqp eager and vqp under torch.compile (the slowest to set up, last);
    ``on_row(result)`` after each one, with the rows so far and the ratios they allow."""
    tokens = elements // len(LEVELS)
    x = torch.randn(1, tokens, len(LEVELS), device=device)
    grad = torch.randn_like(x)
    ours = fsq_triton.ResidualFSQ(levels=LEVELS, num_quantizers=STAGES).to(device)
    rows = {"fsq_triton": ours}
    if vqp is not None:
        reference = vqp.ResidualFSQ(levels=LEVELS, num_quantizers=STAGES).to(device)
        rows["vqp eager"] = reference
        if device.type == "cuda" and compile_rows:
            rows["vqp torch.compile"] = torch.compile(reference, dynamic=False)
    bound_bytes = tokens * len(LEVELS) * 4 * 2 + tokens * STAGES * 4
    result = {"elements": tokens * len(LEVELS), "copy_bandwidth_gbs": bandwidth_gbs,
              "forward_bound_ms": bound_bytes / (bandwidth_gbs * 1e9) * 1e3, "rows": {}}
    time_rows(result, rows, x, grad, device, repeats=repeats, on_row=on_row)
    if "vqp torch.compile" in rows:
        result["compiled_parity"] = compiled_parity(x, ours, rows["vqp eager"], rows["vqp torch.compile"])
        if on_row is not None:
            on_row(result)
    return result


def compiled_parity(x: torch.Tensor, ours, reference, compiled) -> dict:
    """Index mismatches on the timed input between vqp eager, ``torch.compile`` of vqp (already compiled by the
    timing: no new compile) and fsq_triton with the soft clamp in the kernel and in torch ops. Inductor evaluates
    ``torch.tanh`` with libdevice's ``tanhf``, as the kernel does: if compiled vqp differs from eager vqp as the
    in-kernel soft clamp does, and matches it, the extra pass of the torch-op soft clamp buys parity with eager vqp
    only, not with vqp as compiled."""
    counts = {"elements": x.numel()}
    default = fsq_triton.ResidualFSQ.soft_clamp_in_kernel
    try:
        with torch.no_grad():
            reference.eval()
            i_eager, i_compiled = reference(x)[1], compiled(x)[1]
            counts["vqp_compiled_vs_eager"] = int((i_compiled != i_eager).sum())
            for inside in (True, False):
                fsq_triton.ResidualFSQ.soft_clamp_in_kernel = inside
                i_ours = ours.eval()(x)[1]
                where = "kernel" if inside else "torch"
                counts[f"soft_clamp_in_{where}_vs_vqp_eager"] = int((i_ours != i_eager).sum())
                counts[f"soft_clamp_in_{where}_vs_vqp_compiled"] = int((i_ours != i_compiled).sum())
    finally:
        fsq_triton.ResidualFSQ.soft_clamp_in_kernel = default
    return counts


# ------------------------------------------------------------------------------------------------------------------
# The cases with projections, bfloat16 under autocast
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectedCase:
    key: str              # the JSON line's kind
    kwargs: dict          # of both modules
    groups: int = 0       # 0: ResidualFSQ, else GroupedResidualFSQ

    @property
    def dim(self) -> int:
        return self.kwargs["dim"]

    @property
    def indices_per_token(self) -> int:
        return max(self.groups, 1) * self.kwargs["num_quantizers"]

    def module_text(self) -> str:
        name = "GroupedResidualFSQ" if self.groups else "ResidualFSQ"
        return f"{name}({', '.join(f'{k}={v}' for k, v in self.kwargs.items())})"

    def build(self, device, vqp):
        """(fsq_triton's module, vqp's loaded with its state_dict (strict) or None without vqp), on ``device``."""
        torch.manual_seed(0)
        ours = (fsq_triton.GroupedResidualFSQ if self.groups else fsq_triton.ResidualFSQ)(**self.kwargs)
        reference = None
        if vqp is not None:
            reference = (vqp.GroupedResidualFSQ if self.groups else vqp.ResidualFSQ)(**self.kwargs)
            reference.load_state_dict(ours.state_dict(), strict=True)
            reference = reference.to(device)
        return ours.to(device), reference


PROJECTED_CASES = {
    "projected": ProjectedCase("projected", dict(levels=[8, 5, 5, 5], num_quantizers=8, dim=1024)),
    "grouped": ProjectedCase("grouped", dict(dim=1024, groups=2, levels=[5, 5, 5, 5], num_quantizers=2), groups=2),
}


def projected_parity(ours, reference, x: torch.Tensor, device) -> dict:
    """Indices and quantized output of one eval-mode forward of each module under no_grad and autocast."""
    ours.eval()
    reference.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        q_ours, i_ours = ours(x)[:2]
        q_ref, i_ref = reference(x)[:2]
    if q_ours.shape != q_ref.shape or i_ours.shape != i_ref.shape:
        return {"error": f"shapes differ: quantized {tuple(q_ours.shape)} vs vqp {tuple(q_ref.shape)}, "
                         f"indices {tuple(i_ours.shape)} vs vqp {tuple(i_ref.shape)}"}
    diff = q_ours.float() - q_ref.float()
    return {"indices": i_ours.numel(), "index_mismatches": int((i_ours != i_ref).sum()),
            "quantized_max_abs_diff": float(diff.abs().max()), "quantized_mismatches": int((diff != 0).sum()),
            "quantized_dtype": str(q_ours.dtype).removeprefix("torch."),
            "vqp_quantized_dtype": str(q_ref.dtype).removeprefix("torch.")}


class ProjectedRun:
    """One case with projections: its modules and input, its parity and its timed rows, reported as one dict that grows
    (``emit(case_dict)`` after each part)."""

    def __init__(self, case: ProjectedCase, tokens: int, device, vqp, bandwidth_gbs: float, emit, repeats: int,
                 fuse_project_in: bool = False):
        self.case, self.device, self.vqp, self.emit, self.repeats = case, device, vqp, emit, repeats
        self.fuse_project_in = fuse_project_in
        self.ours, self.reference = case.build(device, vqp)
        generator = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(1, tokens, case.dim, generator=generator, device=device).to(torch.bfloat16)
        self.grad = torch.randn(1, tokens, case.dim, generator=generator, device=device).to(torch.bfloat16)
        bound_bytes = 2 * self.x.numel() * self.x.element_size() + tokens * case.indices_per_token * 4
        self.data = {"module": case.module_text(), "input": f"{tuple(self.x.shape)} bfloat16",
                     "autocast": f"torch.autocast({device.type!r}, dtype=torch.bfloat16), float32 weights",
                     "tokens": tokens, "elements": self.x.numel(), "vqp": vqp is not None}
        self.speed = {"copy_bandwidth_gbs": bandwidth_gbs, "forward_bound_bytes": bound_bytes,
                      "forward_bound_ms": bound_bytes / (bandwidth_gbs * 1e9) * 1e3, "rows": {}}

    def _guard(self, what: str, fn) -> None:
        """Run one part; an exception is recorded in the case's report (``errors``), not raised: what follows runs."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 (recorded; the other cases and rows still run)
            first_line = str(err).splitlines()[0] if str(err) else ""
            self.data.setdefault("errors", {})[what] = f"{type(err).__name__}: {first_line}"[:300]
            self.emit(self.data)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def fused_in(self):
        """A copy of fsq_triton's module with ``fuse_project_in`` (the same weights)."""
        module = copy.deepcopy(self.ours)
        module.fuse_project_in = True
        return module

    def parity(self) -> None:
        def run():
            self.data["parity"] = projected_parity(self.ours, self.reference, self.x, self.device)
            if self.fuse_project_in:  # opt-in, not vqp bit for bit: the count says how far
                self.data["parity"]["fuse_project_in"] = projected_parity(self.fused_in(), self.reference, self.x,
                                                                          self.device)
            self.emit(self.data)

        if self.reference is None:
            self.data["parity"] = {"skipped": "vector-quantize-pytorch is not installed"}
            self.emit(self.data)
        else:
            self._guard("parity", run)

    def time(self, rows: dict) -> None:
        def on_row(result):
            self.data["speed"] = result
            self.emit(self.data)

        for name, module in rows.items():
            self._guard(name, lambda name=name, module=module: time_rows(
                self.speed, {name: module}, self.x, self.grad, self.device, autocast=True, repeats=self.repeats,
                on_row=on_row))

    def project_in_row(self) -> None:
        """``project_in`` alone (the ``nn.Linear`` that stays outside the kernel, on purpose: README), timed on the
        same input under the same autocast, beside its own bound (read ``x``, write ``h``): what fusing it could save."""
        def run():
            linears = [rvq.project_in for rvq in getattr(self.ours, "rvqs", [self.ours])]
            chunks = self.x.chunk(len(linears), dim=-1)

            def forward():
                with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16):
                    for linear, chunk in zip(linears, chunks):
                        linear(chunk)

            h_bytes = sum(c.shape[0] * c.shape[1] * linear.out_features * 2 for linear, c in zip(linears, chunks))
            bound_ms = (self.x.numel() * self.x.element_size() + h_bytes) / (self.speed["copy_bandwidth_gbs"] * 1e9) * 1e3
            ms = _time_ms(forward, self.device, self.repeats)
            self.speed["project_in"] = {"forward_ms": ms, "bound_ms": bound_ms, "over_bound": ms / bound_ms}
            self.data["speed"] = self.speed
            self.emit(self.data)

        self._guard("project_in", run)

    def eager_rows(self) -> None:
        self.project_in_row()
        rows = {"fsq_triton": self.ours}
        if self.fuse_project_in:
            rows["fsq_triton fuse_project_in"] = self.fused_in()
        if self.reference is not None:
            rows["vqp eager"] = self.reference
        self.time(rows)

    def compile_row(self) -> None:
        if self.reference is None or self.device.type != "cuda":
            return
        torch.compiler.reset()  # the previous cases' graphs: no recompile limit shared with them
        self.time({"vqp torch.compile": torch.compile(self.reference, dynamic=False)})


# ------------------------------------------------------------------------------------------------------------------


class Report:
    """The report, assembled from the lines as they are printed (and rewritten to ``--out`` after each)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.data: dict = {}

    def emit(self, kind: str, value: dict) -> None:
        value = dict(value, at_s=round(time.monotonic() - START, 1))
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


def _cases(text: str, option: str) -> list[str]:
    if text in ("all", ""):
        return list(CASES) if text == "all" else []
    if text == "none":
        return []
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        raise SystemExit(f"{option}: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}, all or none")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=20_000_000,
                        help="elements of dim4's parity check (default 20M)")
    parser.add_argument("--speed-elements", type=int, default=None,
                        help="elements of dim4's timed input (default: --elements)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens of the projected and grouped cases (default 2**17 on CUDA, 64 on the CPU)")
    parser.add_argument("--cases", default="all", help=f"comma-separated, of {', '.join(CASES)} (default all)")
    parser.add_argument("--compile-cases", default="all",
                        help="the cases whose torch.compile row of vqp is timed (default all; none: no compile rows)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats a row and mode (default 20)")
    parser.add_argument("--fuse-project-in", action="store_true",
                        help="the projected and grouped cases also run ResidualFSQ.fuse_project_in (opt-in: project_in "
                             "in the kernel too): its index mismatches against vqp and its timed row")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="also write the assembled report (one JSON object) to this file")
    args = parser.parse_args(argv)
    cases, compiled = _cases(args.cases, "--cases"), _cases(args.compile_cases, "--compile-cases")
    device = torch.device(args.device)
    tokens = args.tokens or DEFAULT_TOKENS.get(device.type, DEFAULT_TOKENS["cpu"])
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
    report.update(cases=cases, compile_cases=[c for c in compiled if c in cases], tokens=tokens)
    out = Report(args.out)
    out.emit("environment", report)
    if "dim4" in cases:
        for semantics in (["current"] if vqp else []) + ["pre-1.26"]:
            out.emit("parity", parity(semantics, args.elements, device, vqp))
    bandwidth = _copy_gbs(device)
    if "dim4" in cases:
        speed(args.speed_elements or args.elements, device, vqp, bandwidth, on_row=lambda row: out.emit("speed", row),
              repeats=args.repeats, compile_rows="dim4" in compiled)
    runs = []
    for key in (c for c in CASES if c in cases and c in PROJECTED_CASES):
        case = PROJECTED_CASES[key]
        try:
            run = ProjectedRun(case, tokens, device, vqp, bandwidth, lambda data, key=key: out.emit(key, data),
                               args.repeats, args.fuse_project_in)
        except Exception as err:  # noqa: BLE001 (recorded; the next case still runs)
            out.emit(key, {"module": case.module_text(), "errors": {"build": f"{type(err).__name__}: {err}"[:300]}})
            continue
        run.parity()
        run.eager_rows()
        runs.append(run)
    for run in runs:  # Inductor's compiles, the slowest rows to set up: last
        if run.case.key in compiled:
            run.compile_row()
    return 0


if __name__ == "__main__":
    sys.exit(main())
