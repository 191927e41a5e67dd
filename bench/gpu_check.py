"""Every GPU claim measured in one command of at most 8 minutes: ``OUT=gpu-results python bench/gpu_check.py``.

Run it first in a GPU window (about 15 minutes, machine start included), from the repository root of a
checkout, with torch and triton installed (the lent GPU machines: Python 3.12, torch 2.11, triton 3.6, no
package index). The package runs from this checkout; nothing is installed except the peer below.

Steps, in order of importance, each in its own process under its own time limit (seconds). Expected: the
first H200 run (torch 2.11, triton 3.6, 2026-11-28, bench/results/2026-11-28-h200/) where a step finished there,
else an estimate from what it measured:

| step | what | expected | limit |
| --- | --- | --- | --- |
| a | environment (GPU, driver, torch, triton) and the copy bandwidth (1 GiB copy) | 5 (measured 4.7) | 10 |
| b | correctness: indices and ``out`` bit for bit against the reference module op for op on the same GPU (video 32x6x32x128x128 float32 and bfloat16, every calibrated threshold and its neighbours for 8 level sets in 2 layouts, projections float32/bfloat16/float16, decode, gradients): mismatch counts | 35 (34.4) | 45 |
| c | core speed: forward float32, forward bfloat16, forward+backward float32 as % of the copy bandwidth and against the reference, ``torch.compile`` of it, vqp, fsq_triton compiled | 37 (34.9; 37.1 rerun) | 45 |
| d | projections x 64x4096x1024 bfloat16 (bound, vqp, reference, forward+backward); the tiny call 64x5x32x32 against one elementwise launch, compiled, eager and replayed from a CUDA graph | 36 (33.6; 36.3 rerun) | 45 |
| v | vqp 1.32's options (issue 11): default, ``bound_hard_clamp``, ``preserve_symmetry``, both, ``channel_first`` (3-d ``(b, d, n)``), ``return_indices=False``, ``orthogonal_rotation``, ``noise_dropout`` in training, ``track_usage``, each on 32x262144x4 float32 values (33.5M), levels [8,5,5,5]: index and output mismatches against vqp's FSQ with the same options and state (the noisy forward: its indices against vqp's and its own without noise; ``track_usage``: its counts against a bincount), the forward's time over the plain forward's (eager and from a CUDA graph) | 25 (estimate) | 35 |
| p | Nsight Compute (``ncu --clock-control none``, sections SpeedOfLight, Occupancy, LaunchStats, WarpStateStats, ComputeWorkloadAnalysis) over ``bench/profile_kernels.py``: the float32 forward at the old and the new default configuration, the bfloat16 forward, the backward and the residual forward, each launched twice; one row of counters a launch (duration, DRAM and SM throughput, issue slots, occupancy, registers, the top stall reasons) | 40 (estimate) | 50 |
| e | ``pytest -m gpu``, every GPU test function with at most 2 of its parametrizations (64 of 195 tests), each test under its own limit (60 s), no test started in the last 15 s (``bench/pytest_time_limit.py``) | 70 (estimate) | 80 |
| f | ``python -m fsq_triton autotune --quick --reset`` (at most 3 configurations a kernel), then a second process that must not re-tune | 30 (estimate) | 40 |
| r | ResidualFSQ (issue 12, ``scripts/residual_gpu_check.py``, one JSON line a result): ``dim4`` (8x[8,5,5,5], no projections) index parity with vqp on 20M elements, speed against vqp eager and compiled; then ``projected`` (1024 -> 4 -> 1024) and ``grouped`` (ChatTTS-like, 2 groups), bfloat16 under autocast, 2**17 tokens: index parity with vqp, fsq_triton and vqp eager (their compiled rows: ``--cases projected,grouped`` alone, about 55 s) | 82 (70 + 12, estimate) | 85 |
| g | ``python -m fsq_triton bench --quick --no-compile`` | 40 (estimate) | what is left (>= 45) |
| | total | 400 | 480 (8 minutes) |

The limits add up to 480 s (10 + 45 + 45 + 45 + 35 + 50 + 80 + 40 + 85 = 435, and g gets the 45 s left, or more when
the steps before it end early; step v's 35 s came from a (measured 4.7 s), b (34.4 s), p and e, whose deadline
keeps it inside any limit at the cost of the last few sampled tests), and the driver never gives a step more than
what is left of the 480 s
(``--budget``), so the steps end within 8 minutes; installing the peers before them and writing the outputs after
each take a few seconds more. The estimates, from the first run's logs: e ran 83 of the 195 GPU tests in its 90 s
(1.08 s a test, pytest's start included), so 64 tests take about 64 x 1.08 = 69 s, about 70; more if the compile tests
that run did not reach cost more than the average (``--test-sample 0`` runs all 195: 3.5 minutes or more); f's
full search took 35 s for the first of its 4 shapes (3 kernels x 23 configurations, about 0.5 s each), and
--quick times 3 a kernel: 4 shapes x 9 x 0.5 s = 18 s, plus two process starts (about 5 s each); r ran 20M elements in under 75 s
on its own (100M did not finish in 45 s), and its projected and grouped cases add about 12 s (up to four Triton
compiles of about 2.5 s, the residual forward and backward behind the projections and the grouped [5,5,5,5] ones, and
about 1 s of parity and eager rows), not their ``torch.compile`` rows (about 17 s each, which would take r past its
limit; bench/NOTES.md has the arithmetic); g's 7 FSQ cases took 101 s, 79 s of it the first calls of the compiled
rows (the first-call table of its results.md), so without them (steps c and d time them) and without the
ResidualFSQ cases (step r has them) about 22 s, after a start of about 10 s; p (ncu has not run here yet) replays each
of its 10 launches once per pass of its 5 sections (a few dozen passes of a 0.1-0.7 ms kernel) after 5 Triton
compiles and 1.5 GB of inputs: about 40 s; v (not run on a GPU yet): a process start (about 4 s, as step a), five
Triton compiles of the forward kernel (the default channel-last launch, channel-first, no indices, noise, usage
counts; about 1.5 s each), 9 vqp forwards and 18 do_bench timings of about 0.3 s: about 25 s. Steps c and d time
the default launch configurations (autotune runs in f).

Output in ``$OUT`` (or ``--out``; default ``gpu-results``), rewritten as soon as each step ends, so a run cut
short still brings back what it got; four files, one folder:

- ``summary.md``: the steps (status, time, limit), each target beside its measured value, the mismatch counts;
- ``results.json``: the same and every row the steps measured;
- ``bench.png``: the plot of step g;
- ``logs.tar.gz``: each step's log and JSON, the GPU tests' JUnit XML, the bench's results.json/.md.

The peer: vector-quantize-pytorch is not on the GPU machines and they reach no package index. Copy its
wheels into the git-ignored ``.gpu-wheels/`` before the window (``cp /work/shared/gpu-wheels/*.whl
.gpu-wheels/``, see bench/NOTES.md) and carry that folder along; the driver installs them with ``pip
install --no-index --no-deps --no-compile --target`` into its work folder and puts that on ``PYTHONPATH``
for every step. Without them the vqp rows say why they are absent.

``--cpu`` is the plumbing check that CI runs without a GPU (``tests/test_gpu_check.py``): the same steps
with tiny shapes on CPU tensors, the kernels under Triton's interpreter; steps that need a GPU say so. Its
figures are not measurements and no target is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUDGET_S = 480.0
TEST_TIME_LIMIT_S = 60
# step e runs every GPU test function with at most this many of its parametrizations (bench/pytest_time_limit.py):
# 64 of the 195 GPU tests (2026-11-28). All 195 did not fit: 83 ran in the 90 s of the first H200 run.
TEST_SAMPLE = 2
TEST_DEADLINE_MARGIN_S = 15  # step e starts no test in the last 15 s of its limit, so pytest ends by itself
# the second process of step f: on-the-fly tuning on, it loads step f's cache and must tune nothing it holds
SECOND_PROCESS = """
import json, os
os.environ["FSQ_TRITON_AUTOTUNE"] = "1"
import torch, fsq_triton
from fsq_triton import autotune
device = torch.device("cuda", torch.cuda.current_device())
fsq = fsq_triton.FSQ([8, 8, 8, 5, 5, 5]).to(device)
fsq(torch.randn(8, 6, 16, 64, 64, device=device))
torch.cuda.synchronize()
print(json.dumps({"cache": str(autotune.cache_path(device)), "entries": len(autotune._cached(device)),
                  "retuned": len(autotune._TUNED_LOG)}))
"""


@dataclass(frozen=True)
class Step:
    letter: str
    name: str
    what: str
    expected_s: float
    limit_s: float | None  # None: what is left of the budget


STEPS = (
    Step("a", "environment", "environment and copy bandwidth", 5, 10),
    Step("b", "correctness", "bit-for-bit correctness against the reference", 35, 45),
    Step("c", "core", "core speed targets", 37, 45),
    Step("d", "projections", "projections, tiny call, compiled vs eager", 36, 45),
    Step("v", "variants", "vqp 1.32's options: parity with vqp, speed against the plain forward, usage tracking's cost", 25, 35),
    Step("p", "profile", "Nsight Compute counters of the kernels that missed their targets (bench/profile_kernels.py)", 40, 50),
    Step("e", "gpu-tests", f"GPU tests (pytest -m gpu, at most {TEST_SAMPLE} parametrizations a test)", 70, 80),
    Step("f", "autotune", "autotune --quick, and a second process that must not re-tune", 30, 40),
    Step("r", "residual", "ResidualFSQ: parity with vqp, speed (scripts/residual_gpu_check.py)", 82, 85),
    Step("g", "bench", "python -m fsq_triton bench --quick --no-compile", 40, None),
)


class Run:
    """One run of the check: the work folder (logs, step JSON), the output folder, and what each step found."""

    def __init__(self, out: Path, cpu: bool, budget_s: float, wheels: Path, test_sample: int = TEST_SAMPLE):
        self.out, self.cpu, self.budget_s, self.wheels = out, cpu, budget_s, wheels
        self.test_sample = test_sample
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="fsq-gpu-check-"))
        (self.work / "logs").mkdir()
        self.start = time.monotonic()
        self.python = sys.executable
        self.results: dict = {
            "mode": "cpu plumbing check (tiny shapes, kernels under Triton's interpreter): not a measurement"
                    if cpu else "gpu",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "budget_s": budget_s, "peers": {}, "steps": {}, "targets": [],
        }
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1" if cpu else "0",
                        FSQ_TRITON_CACHE_DIR=str(self.work / "tuning-cache"))
        self.env.pop("FSQ_TRITON_AUTOTUNE", None)
        if cpu:  # one CPU thread a process: spinning worker threads stall each other on a busy machine
            self.env["OMP_NUM_THREADS"] = "1"
        self._python_path([str(ROOT)])

    def _python_path(self, first: list[str]) -> None:
        rest = [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
        self.env["PYTHONPATH"] = os.pathsep.join([*first, *rest])

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    # ---------------------------------------------------------------------------------------------- peers

    def install_peers(self) -> None:
        """Install the wheels in ``self.wheels`` (vector-quantize-pytorch and its dependencies) beside torch."""
        wheels = sorted(self.wheels.glob("*.whl")) if self.wheels.is_dir() else []
        peers = self.results["peers"]
        if not wheels:
            peers["wheels"] = f"no wheels in {self.wheels}: vqp rows only where vector-quantize-pytorch is already importable"
        else:
            site = self.work / "site"
            log = self.work / "logs" / "wheels.log"
            with log.open("w") as f:
                done = subprocess.run([self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                       "--target", str(site), *map(str, wheels)], stdout=f, stderr=subprocess.STDOUT,
                                      timeout=120)
            if done.returncode == 0:
                self._python_path([str(site), str(ROOT)])
                peers["wheels"] = f"installed {', '.join(w.name for w in wheels)} into the work folder"
            else:
                peers["wheels"] = f"pip could not install {self.wheels}/*.whl (exit {done.returncode}, see logs/wheels.log)"
        probe = subprocess.run([self.python, "-c", "import vector_quantize_pytorch, importlib.metadata as m; "
                                "print(m.version('vector-quantize-pytorch'))"], env=self.env, capture_output=True, text=True)
        peers["vector_quantize_pytorch"] = probe.stdout.strip() if probe.returncode == 0 else None
        print(f"peers: {peers}", flush=True)

    # ---------------------------------------------------------------------------------------------- steps

    def run_command(self, command: list[str], log_name: str, limit_s: float, env: dict | None = None) -> tuple[int | None, float]:
        """Run ``command`` in its own process group, output to logs/<log_name>; (exit status or None if killed, seconds)."""
        log = self.work / "logs" / log_name
        begin = time.monotonic()
        with log.open("a") as f:
            f.write(f"$ {' '.join(command)}\n")
            f.flush()
            proc = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(limit_s, 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and anything it started (compile workers)
                proc.wait()
                rc = None
                f.write(f"\n[gpu_check] killed at its time limit of {limit_s:.0f} s\n")
        return rc, time.monotonic() - begin

    def step(self, step: Step) -> None:
        left = self.left_s()
        limit = left if step.limit_s is None else min(step.limit_s, left)
        entry = {"what": step.what, "expected_s": step.expected_s, "limit_s": round(limit, 1), "seconds": 0.0,
                 "status": None, "reason": None, "result": None}
        self.results["steps"][step.letter] = entry
        print(f"== {step.letter}. {step.what} (limit {limit:.0f} s)", flush=True)
        if limit < 5:
            entry.update(status="skipped", reason=f"no time left in the {self.budget_s:.0f} s budget")
        else:
            getattr(self, f"step_{step.name.replace('-', '_')}")(step, entry, limit)
        print(f"   {entry['status']}{': ' + entry['reason'] if entry['reason'] else ''} ({entry['seconds']:.1f} s)", flush=True)
        self.write()

    def _status(self, entry: dict, rc: int | None, seconds: float, limit: float) -> None:
        entry["seconds"] = round(entry["seconds"] + seconds, 1)
        if rc is None:
            entry.update(status="timed out", reason=f"killed at its limit of {limit:.0f} s; what it finished is kept")
        elif rc != 0:
            entry.update(status="failed", reason=f"exit status {rc}; see its log in logs.tar.gz")
        else:
            entry["status"] = "ok"

    def _measuring_step(self, step: Step, entry: dict, limit: float) -> None:
        """Steps a-d and v: bench/gpu_targets.py in its own process, rows read back from <name>.json."""
        command = [self.python, str(BENCH / "gpu_targets.py"), step.name, "--work", str(self.work)]
        rc, seconds = self.run_command(command + (["--cpu"] if self.cpu else []), f"{step.letter}-{step.name}.log", limit)
        self._status(entry, rc, seconds, limit)
        data = self.work / f"{step.name}.json"
        entry["result"] = json.loads(data.read_text()) if data.is_file() else None

    step_environment = step_correctness = step_core = step_projections = step_variants = _measuring_step

    def step_profile(self, step: Step, entry: dict, limit: float) -> None:
        """ncu over bench/profile_kernels.py: one row of counters a kernel launch (the raw page, selected columns)."""
        script, order, raw = BENCH / "profile_kernels.py", self.work / "profile-order.json", self.work / "ncu-raw.csv"
        if self.cpu:  # the launches on tiny CPU tensors under the interpreter; no counters without a GPU
            rc, seconds = self.run_command([self.python, str(script), "--cpu", "--order", str(order)], "p-profile.log", limit)
            self._status(entry, rc, seconds, limit)
            entry["result"] = {"rows": [], "notes": ["CPU check: the profiled launches ran under the interpreter; "
                                                     "ncu needs a GPU, so there are no counters"]}
            return
        ncu = shutil.which("ncu") or next((str(p) for p in (Path("/usr/local/cuda/bin/ncu"),) if p.is_file()), None)
        if ncu is None:
            entry.update(status="skipped", reason="ncu is not on PATH (nor /usr/local/cuda/bin/ncu)")
            return
        command = [ncu, "--clock-control", "none", "--target-processes", "all", "-k", "regex:_fsq_|_residual_",
                   *[arg for section in NCU_SECTIONS for arg in ("--section", section)],
                   "--csv", "--page", "raw", "--log-file", str(raw), self.python, str(script), "--order", str(order)]
        rc, seconds = self.run_command(command, "p-profile.log", limit)
        self._status(entry, rc, seconds, limit)
        names = json.loads(order.read_text()) if order.is_file() else []
        rows = ncu_rows(raw, names)
        entry["result"] = {"rows": rows, "notes": [] if rows else ["ncu wrote no rows: see p-profile.log in logs.tar.gz"]}

    def step_gpu_tests(self, step: Step, entry: dict, limit: float) -> None:
        junit = self.work / "gpu-tests.xml"
        env = dict(self.env, FSQ_TRITON_TEST_TIME_LIMIT=str(TEST_TIME_LIMIT_S), FSQ_TRITON_TEST_SAMPLE=str(self.test_sample),
                   FSQ_TRITON_TEST_DEADLINE=str(time.time() + limit - min(TEST_DEADLINE_MARGIN_S, limit / 4)))
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env["PYTHONPATH"]])
        command = [self.python, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
                   "-p", "pytest_time_limit", "-o", f"faulthandler_timeout={TEST_TIME_LIMIT_S + 15}",
                   f"--junitxml={junit}", "tests"]
        rc, seconds = self.run_command(command, "e-gpu-tests.log", limit, env)
        self._status(entry, rc, seconds, limit)
        if rc == 1:
            entry["reason"] = "some GPU tests failed (listed in the result)"
        # JUnit XML when pytest finished; else the verbose log's lines, so that a run cut short still counts
        outcomes = junit_outcomes(junit) if junit.is_file() else log_outcomes(self.work / "logs" / "e-gpu-tests.log")
        counts = {"tests": len(outcomes), "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failed, skip_reasons = [], {}
        for name, outcome, message in outcomes:
            counts[outcome] += 1
            if outcome in ("failed", "errors"):
                failed.append(f"{name}: {message}" if message else name)
            elif outcome == "skipped":
                skip_reasons[message or "skipped"] = skip_reasons.get(message or "skipped", 0) + 1
        sampled = re.search(r"^sample: kept (\d+) of (\d+) tests",
                            (self.work / "logs" / "e-gpu-tests.log").read_text(errors="replace"), re.M)
        entry["result"] = {**counts, "failed_tests": failed, "skip_reasons": skip_reasons,
                           "per_test_limit_s": TEST_TIME_LIMIT_S, "source": "junit" if junit.is_file() else "log",
                           "sample": {"per_test_function": self.test_sample or None,
                                      "selected": int(sampled[1]) if sampled else None,
                                      "gpu_tests": int(sampled[2]) if sampled else None}}
        late = sum(n for reason, n in skip_reasons.items() if reason.startswith("out of time"))
        if late and entry["status"] == "ok":
            entry["reason"] = f"{late} tests not started: out of time ({TEST_DEADLINE_MARGIN_S} s before the limit)"
        if entry["status"] == "ok" and counts["tests"] and counts["skipped"] == counts["tests"]:
            entry.update(status="skipped", reason="every GPU test skipped: " + "; ".join(skip_reasons))

    def step_autotune(self, step: Step, entry: dict, limit: float) -> None:
        rc, seconds = self.run_command([self.python, "-m", "fsq_triton", "autotune", "--quick", "--reset"],
                                       "f-autotune.log", limit)
        self._status(entry, rc, seconds, limit)
        log = (self.work / "logs" / "f-autotune.log").read_text()
        if rc == 2:
            message = next((line for line in log.splitlines() if "autotune" in line and "needs" in line), "exit status 2")
            entry.update(status="skipped", reason=f"{message.strip()}; the second process is skipped too")
            return
        entry["result"] = {"report": log.strip().splitlines()[-30:]}  # the table of choices and the cache path
        if rc != 0:
            return
        second = self.work / "logs" / "f-second-process.log"
        rc, seconds = self.run_command([self.python, "-c", SECOND_PROCESS], second.name, limit - entry["seconds"])
        self._status(entry, rc, seconds, limit)
        lines = [line for line in second.read_text().splitlines() if line.startswith("{")]
        if lines:
            entry["result"]["second_process"] = json.loads(lines[-1])

    def step_residual(self, step: Step, entry: dict, limit: float) -> None:
        script = ROOT / "scripts" / "residual_gpu_check.py"
        if not script.is_file():
            entry.update(status="skipped", reason=f"{script.relative_to(ROOT)} is not in this checkout")
            return
        # the CPU check runs the residual kernels' PyTorch path on a tiny input (the interpreter would take minutes);
        # on the GPU, vqp's torch.compile row of dim4 only: the projected and grouped cases' Inductor compiles (about
        # 32 s) do not fit the step's limit (bench/NOTES.md, step r; `--cases projected,grouped` times them alone)
        size = ["--elements", "512", "--device", "cpu"] if self.cpu else ["--compile-cases", "dim4"]
        env = dict(self.env, TRITON_INTERPRET="0") if self.cpu else self.env
        log = self.work / "logs" / "r-residual.log"
        rc, seconds = self.run_command([self.python, str(script), *size], log.name, limit, env)
        self._status(entry, rc, seconds, limit)
        report = residual_report(log)  # one JSON line a result, printed as each is measured: a cut run keeps them
        if report:
            notes = (["CPU check: the residual modules' PyTorch path on 512 elements (dim4) and 64 tokens "
                      "(projected, grouped)"] if self.cpu else
                     ["projected and grouped: no torch.compile rows here (their Inductor compiles do not fit the "
                      "step's limit): python scripts/residual_gpu_check.py --cases projected,grouped times them"])
            if entry["status"] == "timed out":
                notes.append("cut at its limit: the results printed before the cut are kept "
                             f"({len(report.get('parity', []))} parity rows, speed rows: "
                             f"{', '.join((report.get('speed') or {}).get('rows', {})) or 'none'})")
            entry["result"] = {"report": report, "notes": notes}

    def step_bench(self, step: Step, entry: dict, limit: float) -> None:
        bench_out = self.work / "bench"
        # --no-compile: the Inductor compiles were most of the 197 s that --quick was cut at (H200, 2026-11-28);
        # steps c and d time the compiled rows
        size = ["--smoke", "--device", "cpu", "--no-compile"] if self.cpu else ["--quick", "--no-compile"]
        # the CPU check times fsq_triton's PyTorch path here (the interpreter's bench is tests/test_cli.py's)
        env = dict(self.env, TRITON_INTERPRET="0")
        rc, seconds = self.run_command([self.python, "-m", "fsq_triton", "bench", *size, "--out", str(bench_out)],
                                       "g-bench.log", limit, env)
        self._status(entry, rc, seconds, limit)
        results = bench_out / "results.json"
        if results.is_file():  # the bench rewrites its files after every case: a cut-short run keeps its cases
            bench = json.loads(results.read_text())
            entry["result"] = {"notes": bench["notes"], "rows": compact_bench_rows(bench)}
        if (bench_out / "results.png").is_file():
            shutil.copyfile(bench_out / "results.png", self.out / "bench.png")

    # ---------------------------------------------------------------------------------------------- outputs

    def write(self) -> None:
        """results.json, summary.md and logs.tar.gz in the output folder, from what the steps found so far."""
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.results["targets"] = targets(self.results, judged=not self.cpu)
        _atomic_write(self.out / "results.json", json.dumps(self.results, indent=1) + "\n")
        _atomic_write(self.out / "summary.md", summary_markdown(self.results))
        tmp = self.out / "logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if path.is_file() and path.relative_to(self.work).parts[0] != "site":  # not the installed peers
                    tar.add(path, arcname=str(Path("logs") / path.relative_to(self.work)))
        tmp.replace(self.out / "logs.tar.gz")


# Step p: the sections ncu collects (their metrics land on the raw page), and the columns the summary keeps.
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "ComputeWorkloadAnalysis")
NCU_COLUMNS = {
    "gpu__time_duration.sum": "duration",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
}
NCU_STALL_PREFIX = "smsp__average_warps_issue_stalled_"
NCU_STALL_SUFFIX = "_per_issue_active.ratio"


def ncu_rows(raw: Path, names: list[str]) -> list[dict]:
    """One dict a profiled launch from ncu's ``--csv --page raw`` file: the NCU_COLUMNS that are present, with
    their units, and the three largest stall reasons (warps stalled per issued instruction); ``names`` (the
    launch order bench/profile_kernels.py wrote) names the rows when the counts agree."""
    import csv

    if not raw.is_file():
        return []
    lines = raw.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    table = list(csv.reader(lines[start:]))
    header, units, data = table[0], table[1], [row for row in table[2:] if len(row) == len(table[0])]
    rows = []
    for i, values in enumerate(data):
        cells = dict(zip(header, values))
        row = {"launch": names[i] if len(names) == len(data) else cells.get("Kernel Name", "?")}
        for metric, key in NCU_COLUMNS.items():
            if metric in cells:
                unit = units[header.index(metric)]
                row[key] = f"{cells[metric]} {unit}".strip()
        stalls = []
        for metric, value in cells.items():
            if metric.startswith(NCU_STALL_PREFIX) and metric.endswith(NCU_STALL_SUFFIX):
                try:
                    stalls.append((float(value.replace(",", "")), metric[len(NCU_STALL_PREFIX):-len(NCU_STALL_SUFFIX)]))
                except ValueError:
                    pass
        row["top_stalls"] = ", ".join(f"{name} {value:.2f}" for value, name in sorted(stalls, reverse=True)[:3])
        rows.append(row)
    return rows


def residual_report(log: Path) -> dict | None:
    """scripts/residual_gpu_check.py's report from its JSON lines in ``log`` (``{"environment": ...}``, one
    ``{"parity": ...}`` per semantics, ``{"speed": ...}`` after each timed row, then ``{"projected": ...}`` and
    ``{"grouped": ...}`` after each part of those cases; of each kind but parity the last line, the most complete);
    None when it printed none."""
    report: dict = {}
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if not isinstance(item, dict) or len(item) != 1:
            continue
        (kind, value), = item.items()
        if kind == "environment" and isinstance(value, dict):
            report.update(value)
        elif kind == "parity":
            report.setdefault("parity", []).append(value)
        elif kind in ("speed", "projected", "grouped") and isinstance(value, dict):
            report[kind] = value
    return report or None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def junit_outcomes(path: Path) -> list[tuple[str, str, str]]:
    """(test, outcome, message) of each test case in a JUnit XML file; outcome: passed, failed, errors, skipped."""
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag, outcome in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                message = (found.get("message") or "").strip().splitlines()
                outcomes.append((name, outcome, message[0][:200] if message else ""))
                break
        else:
            outcomes.append((name, "passed", ""))
    return outcomes


def log_outcomes(path: Path) -> list[tuple[str, str, str]]:
    """The same from pytest's ``-v`` lines (``tests/x.py::test PASSED``), for a run stopped before its JUnit XML."""
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    line_re = re.compile(r"^(\S.*::.*?) (PASSED|FAILED|ERROR|SKIPPED)\b(.*?)(?:\s+\[\s*\d+%\])?$")
    outcomes = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        match = line_re.match(line)
        if match:
            outcomes.append((match[1], words[match[2]], match[3].strip(" ()")))
    return outcomes


def compact_bench_rows(bench: dict) -> list[dict]:
    """One row per case, mode and implementation of the bench's results.json: median ms, speedup, % of bound."""
    rows = []
    for case in bench["cases"]:
        for mode, mode_entry in case["modes"].items():
            for name, entry in mode_entry["results"].items():
                rows.append({"case": case["label"], "mode": mode, "implementation": name,
                             "median_ms": entry["median_ms"], "speedup_vs_reference": entry.get("speedup_vs_reference"),
                             "percent_of_bound": entry.get("percent_of_bound"), "error": entry["error"]})
    return rows


# --------------------------------------------------------------------------------------------------
# Targets: each one beside its measured value
# --------------------------------------------------------------------------------------------------


def _rows(results: dict, letter: str) -> list[dict]:
    entry = results["steps"].get(letter) or {}
    result = entry.get("result") or {}
    return result.get("rows", []) if isinstance(result, dict) else []


def _find(rows: list[dict], key: str, text: str) -> dict | None:
    return next((row for row in rows if text in row.get(key, "")), None)


def _missing(results: dict, letter: str) -> str:
    entry = results["steps"].get(letter)
    if entry is None:
        return f"not measured: step {letter} has not run"
    if entry["status"] == "ok":
        return f"not measured by step {letter} (see its notes)"
    return f"not measured: step {letter} {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else "")


def targets(results: dict, judged: bool) -> list[dict]:
    """The issues' targets, each with its goal, the measured value and whether it is met (None: not judged)."""
    out = []

    def add(name, goal, letter, value, met, fmt):
        measured = fmt(value) if value is not None else _missing(results, letter)
        out.append({"target": name, "goal": goal, "step": letter, "measured": measured,
                    "value": value,  # met None: not measured, or an informative row (no target)
                    "met": (bool(met(value)) if value is not None and met is not None else None) if judged else None})
        return out[-1]

    b, c, d = _rows(results, "b"), _rows(results, "c"), _rows(results, "d")
    exact = [row for row in b if row.get("target") == "0 and 0"]
    counted = [row for row in exact if "index_mismatches" in row]
    failed = [row for row in exact if "error" in row]  # a check that could not run: the claim is not shown
    refused = [row for row in exact if "skipped" in row]  # levels that fsq_triton refuses on purpose
    extra = (f"; {len(failed)} could not run" if failed else "") + (f"; {len(refused)} skipped (levels refused)" if refused else "")
    for key, what in (("index_mismatches", "index"), ("output_mismatches", "output")):
        total = sum(row[key] for row in counted) if counted else None
        add(f"{what} mismatches against the reference on the GPU (video float32/bfloat16, planted thresholds)",
            "0", "b", total, lambda v: v == 0 and not failed, lambda v: f"{v} over {len(counted)} checks{extra}")
    for text, goal in (("float32 forward", 90), ("bfloat16 forward", 85), ("float32 forward+backward", 85)):
        row = _find(c, "case", text)
        add(f"video {text}: % of the copy bandwidth", f">= {goal}%", "c", row and row["pct_of_bound"],
            lambda v, g=goal: v >= g, lambda v, r=row: f"{v:.1f}% ({r['fsq_triton_ms']:.3f} ms, bound {r['bound_ms']:.3f} ms)")
    proj = _find(d, "case", "projections") or {}
    add("projections forward: time over the bandwidth bound", "<= 1.3x", "d", proj.get("x_bound"),
        lambda v: v <= 1.3, lambda v: f"{v:.2f}x ({proj['fsq_triton_ms']:.3f} ms, bound {proj['bound_ms']:.3f} ms)")
    add("projections forward: speedup over vqp (bfloat16)", ">= 2x", "d", proj.get("speedup_vs_vqp"),
        lambda v: v >= 2, lambda v: f"{v:.2f}x")
    add("projections forward: speedup over the reference (float32, all it runs)", ">= 3x", "d",
        proj.get("speedup_vs_reference_float32"), lambda v: v >= 3, lambda v: f"{v:.2f}x")
    add("projections forward+backward: speedup over vqp", ">= 1.5x", "d", proj.get("fwd_bwd_speedup_vs_vqp"),
        lambda v: v >= 1.5, lambda v: f"{v:.2f}x")
    if proj and "speedup_vs_vqp" not in proj and proj.get("vqp"):
        out[-3]["measured"] = out[-1]["measured"] = f"not measured: {proj['vqp']}"
    tiny = _find(d, "case", "tiny call") or {}
    add("tiny call 64x5x32x32: time over one elementwise PyTorch launch", "<= 2x", "d", tiny.get("x_elementwise_launch"),
        lambda v: v <= 2, lambda v: f"{v:.2f}x ({tiny['fsq_triton_us']:.1f} us vs {tiny['elementwise_launch_us']:.1f} us)")
    add("tiny call replayed from a CUDA graph: time over one elementwise PyTorch launch", "<= 2x", "d",
        tiny.get("cuda_graph_x_elementwise_launch"), lambda v: v <= 2,
        lambda v: f"{v:.2f}x ({tiny['fsq_triton_cuda_graph_us']:.1f} us vs {tiny['elementwise_launch_us']:.1f} us; "
                  f"the reference's graph {_fmt(tiny.get('reference_cuda_graph_us'))} us)")
    core = _find(c, "case", "float32 forward") or {}
    for label, row, unit in (("tiny call", tiny, "us"), ("video float32 forward", core, "ms")):
        eager, comp, ref = row.get(f"fsq_triton_{unit}"), row.get(f"fsq_triton_compiled_{unit}"), row.get(f"torch_compile_reference_{unit}")
        add(f"{label}: fsq_triton compiled over eager", "<= 1x", "c" if unit == "ms" else "d",
            comp / eager if comp and eager else None, lambda v: v <= 1.0,
            lambda v, e=eager, k=comp: f"{v:.2f}x ({k:.3f} vs {e:.3f} {unit})")
        add(f"{label}: fsq_triton compiled over torch.compile of the reference", "< 1x", "c" if unit == "ms" else "d",
            comp / ref if comp and ref else None, lambda v: v < 1.0,
            lambda v, r=ref, k=comp: f"{v:.2f}x ({k:.3f} vs {r:.3f} {unit})")
    variant_targets(results, add)
    tests = (results["steps"].get("e") or {}).get("result")
    tests_ok = tests and tests["tests"] - tests["skipped"] > 0
    sample = (tests or {}).get("sample") or {}
    of = f" (a sample: {sample['selected']} of the {sample['gpu_tests']} GPU tests)" if sample.get("selected") else ""
    add("GPU tests (pytest -m gpu)", "0 failed, 0 errors", "e",
        (tests["failed"] + tests["errors"]) if tests_ok else None, lambda v: v == 0,
        lambda v, t=tests: f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped{of}")
    report = ((results["steps"].get("r") or {}).get("result") or {}).get("report") or {}
    current = next((row for row in report.get("parity", []) if row.get("semantics") == "current"), {})
    speed = report.get("speed") or {}
    add("ResidualFSQ index mismatches against vqp (current semantics, fused kernel)", "0", "r",
        current.get("index_mismatches"), lambda v: v == 0,
        lambda v, row=current: (f"{v} over {row.get('elements')} elements (soft clamp in the kernel: "
                                f"{row.get('soft_clamp_in_kernel_by_default')}; tanh check: "
                                f"{row.get('tanh_probe_mismatches')} of {row.get('tanh_probe_values')} values differ, "
                                f"soft clamp {row.get('soft_clamp_probe_mismatches')}; "
                                f"forced in kernel {row.get('index_mismatches_soft_clamp_in_kernel')}, in torch "
                                f"{row.get('index_mismatches_soft_clamp_in_torch')})"))
    for key, goal, test in (("forward_over_bound", "<= 1.3x", lambda v: v <= 1.3),
                            ("forward_speedup_vs_vqp eager", ">= 10x", lambda v: v >= 10),
                            ("forward_speedup_vs_vqp torch.compile", ">= 3x", lambda v: v >= 3),
                            ("forward_backward_speedup_vs_vqp eager", ">= 5x", lambda v: v >= 5)):
        add(f"ResidualFSQ 8x[8,5,5,5] {key.replace('_', ' ')}", goal, "r", speed.get(key), test, lambda v: f"{v:.2f}x")
    compiled = speed.get("compiled_parity") or {}
    # informative (no target): whether torch.compile of vqp (Inductor's tanh is libdevice's) matches eager vqp, and
    # which soft clamp of fsq_triton matches which
    add("ResidualFSQ index mismatches, torch.compile(vqp) vs eager vqp (soft clamp in kernel / in torch: vs eager, "
        "vs compiled)", "informative", "r", compiled.get("vqp_compiled_vs_eager"), None,
        lambda v, c=compiled: (f"{v}; in kernel {c.get('soft_clamp_in_kernel_vs_vqp_eager')} / "
                               f"{c.get('soft_clamp_in_kernel_vs_vqp_compiled')}; in torch "
                               f"{c.get('soft_clamp_in_torch_vs_vqp_eager')} / {c.get('soft_clamp_in_torch_vs_vqp_compiled')}"
                               f" of {c.get('elements')} elements"))
    second = ((results["steps"].get("f") or {}).get("result") or {}).get("second_process")
    add("autotune: a second process loads the cache and re-tunes nothing", "0 re-tuned", "f",
        second and second["retuned"], lambda v: v == 0,
        lambda v, s=second: f"{v} re-tuned, {s['entries']} cache entries")
    return out


# Step v (issue 11): "each variant's forward at the plain forward's speed" read as within 10% of it, the same margin
# as "usage tracking within 10%" of the plain forward
VARIANT_SPEED_GOAL_X = 1.10
USAGE_OVERHEAD_GOAL_PCT = 10.0


def variant_targets(results: dict, add) -> None:
    """Step v's targets, through ``targets``'s ``add``: index and output mismatches against vqp over every variant,
    the noisy indices against the noiseless ones, and one speed row a variant (the variants step v planned, so a
    cut run names those it did not reach; one row for all of them before step v has run). ``add`` appends each
    to the list ``targets`` returns, and returns it."""
    rows = _rows(results, "v")
    result = (results["steps"].get("v") or {}).get("result") or {}
    planned = result.get("planned") if isinstance(result, dict) else None
    failed = [row for row in rows if "error" in row]
    no_vqp = next((row["vqp"] for row in rows if row.get("vqp")), None)
    extra = f"; {len(failed)} could not run ({', '.join(row['variant'] for row in failed)})" if failed else ""
    for key, what in (("index_mismatches", "index"), ("output_mismatches", "output")):
        counted = [row for row in rows if key in row]
        total = sum(row[key] for row in counted) if counted else None
        off = ", ".join(f"{row['variant']} {row[key]}"
                        + (f" (max abs diff {row['max_abs_diff']:.2g})" if row.get("max_abs_diff") else "")
                        for row in counted if row[key])
        entry = add(f"vqp 1.32's options: {what} mismatches against vqp with the same options (every variant, one "
                    "large input)", "0", "v", total, lambda v: v == 0 and not failed,
                    lambda v, k=len(counted), off=off: f"{v} over {k} variants" + (f": {off}" if off else "") + extra)
        if total is None and no_vqp:
            entry["measured"] = f"not measured: {no_vqp}"
    noisy = next((row for row in rows if "index_mismatches_vs_no_noise" in row), {})
    add("noise_dropout in training: index mismatches against the same module's indices without noise", "0", "v",
        noisy.get("index_mismatches_vs_no_noise"), lambda v: v == 0,
        lambda v, r=noisy: f"{v} of {r['tokens']} tokens (noise moved {100 * r['noised_fraction']:.1f}% of the values)")
    by_name = {row.get("variant"): row for row in rows}

    def graph(r: dict) -> str:
        return f"; CUDA graph {r['cuda_graph_x_plain']:.2f}x ({r['cuda_graph_ms']:.3f} ms)" if r.get("cuda_graph_x_plain") else ""

    if not planned:
        add("each of vqp 1.32's options: forward time over the plain forward", f"<= {VARIANT_SPEED_GOAL_X}x", "v",
            None, None, None)
        add("track_usage: forward time over the plain forward", f"<= +{USAGE_OVERHEAD_GOAL_PCT:g}%", "v", None, None, None)
        return
    for plan in planned:
        row = by_name.get(plan["variant"], {})
        if plan["speed"] == "x_plain":
            entry = add(f"{plan['variant']}: forward time over the plain forward", f"<= {VARIANT_SPEED_GOAL_X}x", "v",
                        row.get("x_plain"), lambda v: v <= VARIANT_SPEED_GOAL_X,
                        lambda v, r=row: f"{v:.2f}x ({r['fsq_triton_ms']:.3f} vs {r['plain_ms']:.3f} ms){graph(r)}")
        elif plan["speed"] == "overhead_pct":
            entry = add(f"{plan['variant']}: forward time over the plain forward", f"<= +{USAGE_OVERHEAD_GOAL_PCT:g}%",
                        "v", row.get("overhead_pct"), lambda v: v <= USAGE_OVERHEAD_GOAL_PCT,
                        lambda v, r=row: f"{v:+.1f}% ({r['fsq_triton_ms']:.3f} vs {r['plain_ms']:.3f} ms){graph(r)}")
        else:  # the plain forward itself: its errors stop every ratio, said in the rows above
            continue
        why = row.get("speed_error") or row.get("no_ratio") or (row.get("error") if "fsq_triton_ms" not in row else None)
        if why:
            entry["measured"] = f"not measured: {why}"


# --------------------------------------------------------------------------------------------------
# summary.md
# --------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def summary_markdown(results: dict) -> str:
    env_rows = _rows(results, "a")
    env = env_rows[0] if env_rows else {}
    bandwidth = env_rows[1]["copy_bandwidth_gbs"] if len(env_rows) > 1 else None
    lines = ["# GPU check", ""]
    if results["mode"] != "gpu":
        lines += [f"**{results['mode']}.** No target is judged.", ""]
    lines += [
        f"{env.get('device', 'device unknown (step a did not finish)')}; torch {env.get('torch', '?')}, "
        f"triton {env.get('triton', '?')}, Python {env.get('python', '?')}; driver: {env.get('nvidia_smi', '?')}; "
        f"copy bandwidth {_fmt(bandwidth)} GB/s; {results['date']}; `{results['command']}`; "
        f"{results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget.",
        "", f"Peers: {results['peers'].get('wheels', '-')}; vector-quantize-pytorch "
            f"{results['peers'].get('vector_quantize_pytorch') or 'absent'}.", "", "## Steps", "",
    ]
    lines += _table(["step", "what", "status", "seconds", "limit s", "expected s"], [
        [letter, entry["what"], entry["status"] + (f": {entry['reason']}" if entry.get("reason") else ""),
         entry["seconds"], entry["limit_s"], entry["expected_s"]] for letter, entry in results["steps"].items()])
    lines += ["", "## Targets", ""]
    lines += _table(["target", "goal", "measured", "met"], [
        [t["target"], t["goal"], t["measured"], {True: "yes", False: "**no**", None: "-"}[t["met"]]]
        for t in results["targets"]])
    checks = _rows(results, "b")
    if checks:
        lines += ["", "## Correctness (step b): mismatch counts", ""]
        lines += _table(["check", "index mismatches", "output mismatches", "values", "max abs diff", "other"], [
            [row["check"], _fmt(row.get("index_mismatches")), _fmt(row.get("output_mismatches")),
             _fmt(row.get("values")), _fmt(row.get("max_abs_diff")),
             "; ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k in ("beyond_1e-5", "decode_max_abs_diff", "error", "skipped"))
             + ("; grad relative error " + ", ".join(f"{k} {v:.2g}" for k, v in row["grad_relative_error"].items())
                if "grad_relative_error" in row else "")]
            for row in checks])
    report = ((results["steps"].get("r") or {}).get("result") or {}).get("report")
    if report:
        lines += ["", "## ResidualFSQ (step r)", ""]
        lines += [f"- parity, {row.get('semantics')}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "semantics")
                  for row in report.get("parity", [])]
        speed = report.get("speed") or {}
        lines += [f"- {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items())
                  for name, row in (speed.get("rows") or {}).items()]
        lines += [f"- {k}: {_fmt(v)}" for k, v in speed.items() if k != "rows"]
        for kind in ("projected", "grouped"):  # the cases with projections, bfloat16 under autocast
            case = report.get(kind) or {}
            if not case:
                continue
            lines.append(f"- {kind}: " + ", ".join(f"{k} {_fmt(case.get(k))}" for k in ("module", "input", "autocast")))
            lines.append("  - parity: " + ", ".join(f"{k} {_fmt(v)}" for k, v in (case.get("parity") or {}).items()))
            case_speed = case.get("speed") or {}
            lines += [f"  - {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items())
                      for name, row in (case_speed.get("rows") or {}).items()]
            ratios = {k: v for k, v in case_speed.items() if k != "rows"}
            if ratios:
                lines.append("  - " + ", ".join(f"{k} {_fmt(v)}" for k, v in ratios.items()))
            if case.get("errors"):
                lines.append("  - errors: " + "; ".join(f"{k}: {v}" for k, v in case["errors"].items()))
    profile = _rows(results, "p")
    if profile:
        lines += ["", "## Profile (step p): ncu counters a launch", ""]
        keys = ["launch", *NCU_COLUMNS.values(), "top_stalls"]
        lines += _table(keys, [[_fmt(row.get(k)) for k in keys] for row in profile])
    for letter, title in (("c", "Core speed (step c)"), ("d", "Projections and the tiny call (step d)")):
        rows = _rows(results, letter)
        if rows:
            lines += ["", f"## {title}", ""]
            for row in rows:
                lines.append("- " + row.get("case", "?") + ": " + ", ".join(
                    f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("case",)))
    variants = _rows(results, "v")
    if variants:
        lines += ["", "## vqp 1.32's options (step v): parity with vqp, time over the plain forward", ""]
        other = ("output_bit_differences", "index_mismatches_vs_no_noise", "noised_fraction", "usage_count_mismatches",
                 "usage_counted", "pct_of_bound", "cuda_graph_error", "indices", "vqp", "no_ratio", "error", "speed_error")
        lines += _table(["variant", "options", "input", "index mismatches", "output mismatches", "max abs diff", "ms",
                         "x plain", "CUDA graph ms", "CUDA graph x plain", "other"], [
            [row.get("variant", "?"), _fmt(row.get("options")), _fmt(row.get("input")), _fmt(row.get("index_mismatches")),
             _fmt(row.get("output_mismatches")), _fmt(row.get("max_abs_diff")), _fmt(row.get("fsq_triton_ms")),
             _fmt(row.get("x_plain")), _fmt(row.get("cuda_graph_ms")), _fmt(row.get("cuda_graph_x_plain")),
             "; ".join(f"{k} {_fmt(row[k])}" for k in other if k in row)]
            for row in variants])
    notes = [(letter, note) for letter, entry in results["steps"].items()
             for note in ((entry.get("result") or {}).get("notes", []) if isinstance(entry.get("result"), dict) else [])]
    if notes:
        lines += ["", "## Notes", "", *[f"- {letter}: {note}" for letter, note in dict.fromkeys(notes)]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results",
                        help="output folder (default: $OUT, else gpu-results)")
    parser.add_argument("--cpu", action="store_true",
                        help="plumbing check without a GPU: tiny shapes, kernels under Triton's interpreter")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together (default 480)")
    parser.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"), help="folder of peer wheels (default .gpu-wheels/)")
    parser.add_argument("--steps", default="".join(step.letter for step in STEPS),
                        help="which steps to run, e.g. abc (default: all, in order)")
    parser.add_argument("--test-sample", type=int, default=TEST_SAMPLE,
                        help=f"step e: at most this many parametrizations of each GPU test function (default {TEST_SAMPLE}; "
                             "0: every GPU test, 3.5 minutes or more: raise --budget)")
    args = parser.parse_args(argv)
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check.py needs a CUDA GPU; --cpu runs the plumbing check without one", file=sys.stderr)
            return 2
    run = Run(Path(args.out), args.cpu, args.budget, Path(args.wheels), args.test_sample)
    try:
        run.install_peers()
        run.start = time.monotonic()  # the budget is the steps' (installing the peers takes a few seconds before)
        run.write()
        for step in STEPS:
            if step.letter in args.steps:
                run.step(step)
    finally:
        run.write()
        shutil.rmtree(run.work, ignore_errors=True)
    failed = [letter for letter, entry in run.results["steps"].items() if entry["status"] in ("failed", "timed out")]
    missed = [t["target"] for t in run.results["targets"] if t["met"] is False]
    print(f"\nwrote {run.out / 'summary.md'}, results.json, logs.tar.gz" +
          (", bench.png" if (run.out / "bench.png").is_file() else ""))
    print(f"steps failed or timed out: {failed or 'none'}; targets missed: {len(missed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
