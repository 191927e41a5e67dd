"""``bench/gpu_check.py --cpu``: the GPU check's plumbing without a GPU, so that a GPU window is not spent on a typo.

The driver runs every step (a-g, v) with tiny shapes on CPU tensors, the kernels under Triton's interpreter;
each step must run or say plainly why it is skipped, and every output file must be written and parse.
It also checks the correctness rows (the kernels against the reference module op for op, on the CPU).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def test_gpu_check_cpu_plumbing(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "no-wheels").mkdir()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--wheels", str(tmp_path / "no-wheels")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # the four outputs, one folder, nothing else (no leftover temporary files)
    assert sorted(p.name for p in out.iterdir()) == ["bench.png", "logs.tar.gz", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"].startswith("cpu plumbing check")
    assert "no wheels in" in results["peers"]["wheels"]

    steps = results["steps"]
    assert list(steps) == list("abcdvpefrg")
    for letter, entry in steps.items():
        assert entry["status"] in ("ok", "skipped"), (letter, entry)
        if entry["status"] == "skipped":
            assert entry["reason"], letter
        assert 0 < entry["seconds"] <= entry["limit_s"], (letter, entry)
    assert sum(entry["limit_s"] for entry in steps.values()) <= 480 + 1e-6 or steps["g"]["limit_s"] < 480
    assert "needs a CUDA GPU" in steps["e"]["reason"] and steps["e"]["result"]["skipped"] > 0
    sample = steps["e"]["result"]["sample"]  # at most 2 parametrizations of each GPU test function
    assert sample["per_test_function"] == 2 and 0 < sample["selected"] == steps["e"]["result"]["tests"] < sample["gpu_tests"]
    assert "autotune needs a CUDA GPU" in steps["f"]["reason"]
    assert steps["p"]["status"] == "ok" and "no counters" in steps["p"]["result"]["notes"][0]  # the launches ran

    # a: environment and bandwidth; b: mismatch counts, all zero on the CPU; c, d: the timed rows
    env, bandwidth = steps["a"]["result"]["rows"]
    assert env["torch"] and env["triton"] and bandwidth["copy_bandwidth_gbs"] > 0
    checks = steps["b"]["result"]["rows"]
    exact = [row for row in checks if row.get("target") == "0 and 0"]
    assert len(exact) == 2 + 8 * 2  # video float32/bfloat16, 8 level sets in 2 layouts
    assert not [row for row in exact if "error" in row], exact
    counted = [row for row in exact if "skipped" not in row]  # a level set that FSQ refuses says so instead
    assert len(counted) >= 2 + 7 * 2 and all("refuses" in row["skipped"] for row in exact if row not in counted)
    mismatched = [row for row in counted if row["index_mismatches"] or row["output_mismatches"]]
    assert not mismatched, mismatched  # the kernels against the reference module, op for op, on the CPU
    grads = next(row for row in checks if "grad_z" in row["check"])
    assert grads["beyond_1e-5"] == 0
    projections = [row for row in checks if row["check"].startswith("projections")]
    assert [row["check"].split()[3] for row in projections] == ["float32", "bfloat16", "float16"]
    assert all(row["index_mismatches"] == 0 for row in projections), projections
    core = steps["c"]["result"]["rows"]
    assert [row["case"].split(" ", 2)[2] for row in core] == ["float32 forward", "bfloat16 forward", "float32 forward+backward"]
    assert all(row["fsq_triton_ms"] > 0 and row["pct_of_bound"] > 0 for row in core)
    assert any("CUDA only" in note for note in steps["c"]["result"]["notes"])
    assert any("CUDA-graph rows" in note for note in steps["d"]["result"]["notes"])
    assert {row["case"].split()[0] for row in steps["d"]["result"]["rows"]} == {"projections", "tiny"}
    assert steps["g"]["result"]["rows"] and all(row["error"] is None for row in steps["g"]["result"]["rows"])
    assert any(note.startswith("--no-compile") for note in steps["g"]["result"]["notes"])
    assert not [row for row in steps["g"]["result"]["rows"] if row["case"].startswith(("residual", "grouped"))]
    # v: every vqp option against vqp 1.32 (importable on both CI stacks) on the CPU, and the speed rows
    variants = steps["v"]["result"]["rows"]
    assert [row["variant"] for row in variants] == [plan["variant"] for plan in steps["v"]["result"]["planned"]]
    assert len(variants) == 9 and not [row for row in variants if "error" in row], variants
    assert all(row.get("index_mismatches", 0) == 0 for row in variants), variants
    # the outputs bit for bit, but for the rotation's codes @ R.T, summed in the kernel's order, not vqp's matmul's:
    # its bit differences are a note, its mismatches the values beyond float32 rounding (1e-6)
    assert all(row.get("output_mismatches", 0) == 0 for row in variants), variants
    rotation = next(row for row in variants if row["variant"] == "orthogonal_rotation")
    assert rotation["max_abs_diff"] < 1e-6 and "output_bit_differences" in rotation
    assert sum("index_mismatches" in row for row in variants) == 8  # all but return_indices=False
    assert sum("output_mismatches" in row for row in variants) == 8  # all but the noisy training forward
    noisy = next(row for row in variants if "noise_dropout" in row["variant"])
    assert noisy["index_mismatches_vs_no_noise"] == 0 and 0 < noisy["noised_fraction"] < 1
    usage = next(row for row in variants if row["variant"] == "track_usage")
    assert usage["usage_count_mismatches"] == 0 and usage["usage_counted"] == usage["tokens"] and "overhead_pct" in usage
    assert variants[0]["x_plain"] == 1 and all(row["x_plain"] > 0 for row in variants)
    assert any("CUDA only" in note for note in steps["v"]["result"]["notes"])
    residual = steps["r"]["result"]["report"]  # scripts/residual_gpu_check.py's report, on its CPU path
    assert [row["semantics"] for row in residual["parity"]] == ["current", "pre-1.26"]
    assert all(row["index_mismatches"] == 0 for row in residual["parity"])
    for key in ("projected", "grouped"):  # the cases with projections, bfloat16 under autocast, on 64 tokens
        case = residual[key]
        assert "errors" not in case and case["parity"]["index_mismatches"] == 0, case
        assert list(case["speed"]["rows"]) == ["fsq_triton", "vqp eager"] and case["speed"]["forward_bound_ms"] > 0

    # targets: each beside its value, none judged on the CPU
    targets = results["targets"]
    assert len(targets) >= 12 and all(t["met"] is None and t["measured"] for t in targets)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check") and "No target is judged" in summary
    assert "| target | goal | measured | met |" in summary and "## Correctness (step b): mismatch counts" in summary
    assert "## vqp 1.32's options (step v)" in summary and "| track_usage: forward time over the plain forward | <= +10% |" in summary
    headings = [line for line in summary.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), headings

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for log in ("a-environment", "b-correctness", "c-core", "d-projections", "v-variants", "p-profile", "e-gpu-tests",
                "f-autotune", "g-bench"):
        assert f"logs/logs/{log}.log" in names, sorted(names)
    assert "logs/correctness.json" in names and "logs/variants.json" in names and "logs/bench/results.md" in names
    assert "logs/profile-order.json" in names  # bench/profile_kernels.py's launch order, which names ncu's rows
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_step_goes_on_without_vqp(tmp_path):
    """Step v where vector-quantize-pytorch cannot be imported: every variant still runs and is timed, its
    parity targets say why they are not measured, and the checks that need no vqp (the noisy indices against
    the noiseless ones, the usage counts) are still made."""
    blocker = tmp_path / "blocker" / "vector_quantize_pytorch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    out = tmp_path / "out"
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "blocker")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--steps", "v", "--out", str(out),
                           "--wheels", str(tmp_path / "no-wheels")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["peers"]["vector_quantize_pytorch"] is None
    entry = results["steps"]["v"]
    assert entry["status"] == "ok" and any("not importable" in note for note in entry["result"]["notes"])
    rows = entry["result"]["rows"]
    assert len(rows) == 9 and not [row for row in rows if "error" in row or "index_mismatches" in row], rows
    assert all("not importable" in row["vqp"] and row["x_plain"] > 0 for row in rows)
    assert next(row for row in rows if "noise" in row["variant"])["index_mismatches_vs_no_noise"] == 0
    assert next(row for row in rows if row["variant"] == "track_usage")["usage_count_mismatches"] == 0
    targets = {t["target"]: t for t in results["targets"] if t["step"] == "v"}
    parity = [t for name, t in targets.items() if name.startswith("vqp 1.32's options")]
    assert len(parity) == 2 and all(t["measured"].startswith("not measured: vector-quantize-pytorch is not importable")
                                    for t in parity)
    assert len(targets) == 3 + 8 and all(t["measured"] for t in targets.values())
    assert "## vqp 1.32's options (step v)" in (out / "summary.md").read_text()


def test_step_limits_leave_the_bench_its_share_of_the_budget():
    """The fixed limits of the steps before g add up to at most the budget less the 45 s that g (the bench) needs."""
    gpu_check = _gpu_check_module()
    assert [step.letter for step in gpu_check.STEPS] == list("abcdvpefrg")
    assert gpu_check.STEPS[-1].limit_s is None and all(step.limit_s for step in gpu_check.STEPS[:-1])
    assert sum(step.limit_s for step in gpu_check.STEPS[:-1]) <= gpu_check.BUDGET_S - 45
    assert sum(step.expected_s for step in gpu_check.STEPS) <= gpu_check.BUDGET_S - 60  # room for slower steps


STALLING_STEP = """
import json, sys, time
from pathlib import Path
name, work = sys.argv[1], Path(sys.argv[3])
row = {"check": "first", "target": "0 and 0", "index_mismatches": 0, "output_mismatches": 0}
(work / f"{name}.json").write_text(json.dumps({"rows": [row], "notes": []}))
print("wrote the first row", flush=True)
time.sleep(120)
"""


def test_a_step_past_its_limit_is_killed_and_keeps_what_it_finished(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "gpu_targets.py").write_text(STALLING_STEP)  # a measuring step that hangs after one row
    monkeypatch.setattr(gpu_check, "BENCH", tmp_path / "stub")
    run = gpu_check.Run(tmp_path / "out", cpu=True, budget_s=100, wheels=tmp_path / "no-wheels")
    try:
        start = time.monotonic()
        run.step(gpu_check.Step("b", "correctness", "stub", expected_s=1, limit_s=5))
        assert time.monotonic() - start < 30
        run.write()
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    entry = run.results["steps"]["b"]
    assert entry["status"] == "timed out" and "killed at its limit of 5 s" in entry["reason"]
    assert [row["check"] for row in entry["result"]["rows"]] == ["first"]  # what it finished is kept
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["steps"]["b"]["status"] == "timed out"
    assert results["targets"][0]["measured"] == "0 over 1 checks"
    assert "| b | stub | timed out: killed at its limit of 5 s" in (tmp_path / "out" / "summary.md").read_text()
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        log = tar.extractfile("logs/logs/b-correctness.log").read().decode()
    assert "wrote the first row" in log and "killed at its time limit of 5 s" in log


def test_time_limit_plugin_fails_a_slow_test_and_goes_on(tmp_path):
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(30)\n\ndef test_fast():\n    pass\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "bench"), "FSQ_TRITON_TEST_TIME_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "pytest_time_limit",
                           "test_slow.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "test_slow.py::test_slow FAILED" in done.stdout and "test_slow.py::test_fast PASSED" in done.stdout
    assert "ran past its time limit of 1 s" in done.stdout


def test_outcomes_from_junit_and_from_a_cut_short_log(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import junit_outcomes, log_outcomes
    finally:
        sys.path.remove(str(ROOT / "bench"))
    log = tmp_path / "e.log"
    log.write_text(
        "tests/test_gpu.py::test_a PASSED                [  1%]\n"
        "tests/test_gpu.py::test_b[f32-x] FAILED         [  2%]\n"
        "tests/test_gpu.py::test_c SKIPPED (needs a GPU) [  3%]\n"
        "some other line\n"
    )
    assert log_outcomes(log) == [("tests/test_gpu.py::test_a", "passed", ""),
                                 ("tests/test_gpu.py::test_b[f32-x]", "failed", ""),
                                 ("tests/test_gpu.py::test_c", "skipped", "needs a GPU")]
    junit = tmp_path / "e.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="AssertionError: 3 differ">x</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped message="needs a GPU"/></testcase>'
        "</testsuite></testsuites>")
    assert junit_outcomes(junit) == [("tests.test_gpu::test_a", "passed", ""),
                                     ("tests.test_gpu::test_b", "failed", "AssertionError: 3 differ"),
                                     ("tests.test_gpu::test_c", "skipped", "needs a GPU")]


def _gpu_check_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_check


def test_targets_are_judged_from_gpu_shaped_rows():
    """What a GPU run's steps record (rows shaped as gpu_targets.py writes them) -> each target met or missed."""
    gpu_check = _gpu_check_module()
    ok = lambda rows: {"status": "ok", "reason": None, "result": {"rows": rows, "notes": []}}  # noqa: E731
    core = lambda case, ms, pct, **extra: {"case": f"video 32x6x32x128x128 {case}", "fsq_triton_ms": ms,  # noqa: E731
                                           "bound_ms": ms * pct / 100, "pct_of_bound": pct, **extra}
    variant = lambda name, ms, **extra: {"variant": name, "fsq_triton_ms": ms, "plain_ms": 0.2, "x_plain": ms / 0.2,  # noqa: E731
                                         "cuda_graph_ms": ms / 2, "cuda_graph_x_plain": ms / 0.2, **extra}
    results = {"steps": {
        "a": ok([{"device": "NVIDIA H200"}, {"copy_bandwidth_gbs": 4300.0}]),
        "b": ok([{"check": "video float32", "target": "0 and 0", "index_mismatches": 0, "output_mismatches": 2},
                 {"check": "planted", "target": "0 and 0", "index_mismatches": 0, "output_mismatches": 1},
                 {"check": "projections", "index_mismatches": 7}]),  # not a bitwise target: not counted
        "c": ok([core("float32 forward", 0.22, 92.0, fsq_triton_compiled_ms=0.21, torch_compile_reference_ms=0.5),
                 core("bfloat16 forward", 0.15, 80.0), core("float32 forward+backward", 0.5, 86.0)]),
        "d": ok([{"case": "projections x 64x4096x1024 bfloat16", "fsq_triton_ms": 0.3, "bound_ms": 0.25, "x_bound": 1.2,
                  "speedup_vs_vqp": 2.5, "speedup_vs_reference_float32": 2.0, "fwd_bwd_speedup_vs_vqp": 1.6},
                 {"case": "tiny call 64x5x32x32", "fsq_triton_us": 12.0, "elementwise_launch_us": 5.0,
                  "x_elementwise_launch": 2.4, "fsq_triton_compiled_us": 8.0, "torch_compile_reference_us": 20.0,
                  "fsq_triton_cuda_graph_us": 6.0, "reference_cuda_graph_us": 9.0, "cuda_graph_x_elementwise_launch": 1.2}]),
        "v": {"status": "timed out", "reason": "killed at its limit of 35 s; what it finished is kept", "result": {
            "notes": [], "rows": [
                variant("default", 0.2, index_mismatches=0, output_mismatches=0),
                variant("bound_hard_clamp", 0.21, index_mismatches=0, output_mismatches=0),
                variant("orthogonal_rotation", 0.32, index_mismatches=0, output_mismatches=3, max_abs_diff=6e-8),
                variant("noise_dropout=0.5 (training)", 0.216, index_mismatches=0, index_mismatches_vs_no_noise=0,
                        noised_fraction=0.35, tokens=100),
                variant("track_usage", 0.224, index_mismatches=0, output_mismatches=0, overhead_pct=12.0)],
            "planned": [{"variant": "default", "speed": "baseline"}, {"variant": "bound_hard_clamp", "speed": "x_plain"},
                        {"variant": "return_indices=False", "speed": "x_plain"},  # not reached before the cut
                        {"variant": "orthogonal_rotation", "speed": "x_plain"},
                        {"variant": "noise_dropout=0.5 (training)", "speed": "x_plain"},
                        {"variant": "track_usage", "speed": "overhead_pct"}]}},
        "e": {"status": "failed", "reason": "some GPU tests failed", "result": {
            "tests": 10, "passed": 8, "failed": 1, "errors": 0, "skipped": 1}},
        "f": {"status": "ok", "reason": None, "result": {"second_process": {"retuned": 0, "entries": 5}}},
        "r": {"status": "ok", "reason": None, "result": {"notes": [], "report": {
            "parity": [{"semantics": "current", "elements": 100, "index_mismatches": 0,
                        "index_mismatches_soft_clamp_in_kernel": 0, "index_mismatches_soft_clamp_in_torch": 0,
                        "tanh_probe_values": 4500, "tanh_probe_mismatches": 0, "soft_clamp_probe_mismatches": 0,
                        "soft_clamp_in_kernel_by_default": True}],
            "speed": {"rows": {}, "forward_over_bound": 1.1, "forward_speedup_vs_vqp eager": 12.0,
                      "forward_speedup_vs_vqp torch.compile": 2.5, "forward_backward_speedup_vs_vqp eager": 6.0,
                      "compiled_parity": {"elements": 100, "vqp_compiled_vs_eager": 7,
                                          "soft_clamp_in_kernel_vs_vqp_eager": 7, "soft_clamp_in_kernel_vs_vqp_compiled": 0,
                                          "soft_clamp_in_torch_vs_vqp_eager": 0, "soft_clamp_in_torch_vs_vqp_compiled": 7}}}}},
    }}
    judged = {t["target"]: t for t in gpu_check.targets(results, judged=True)}
    met = {name: t["met"] for name, t in judged.items()}
    assert judged["ResidualFSQ index mismatches against vqp (current semantics, fused kernel)"]["measured"] == (
        "0 over 100 elements (soft clamp in the kernel: True; tanh check: 0 of 4500 values differ, soft clamp 0; "
        "forced in kernel 0, in torch 0)")
    assert [t["measured"] for t in judged.values()][:2] == ["0 over 2 checks", "3 over 2 checks"]
    # a check that could not run fails the target whatever the counts; a refused level set is only said
    results["steps"]["b"]["result"]["rows"] += [{"check": "x", "target": "0 and 0", "error": "RuntimeError: boom"},
                                                {"check": "y", "target": "0 and 0", "skipped": "FSQ refuses them"}]
    index_target = gpu_check.targets(results, judged=True)[0]
    assert index_target["met"] is False
    assert index_target["measured"] == "0 over 2 checks; 1 could not run; 1 skipped (levels refused)"
    del results["steps"]["b"]["result"]["rows"][-2:]
    expected = [True, False, True, False, True, True, True, False, True, False, True, True, True, True, True,
                True, False, True, True, None, False, True, False,  # step v
                False, True, True, True, False, True, None, True]  # None: the informative compiled-vqp row
    assert list(met.values()) == expected, met
    compiled = next(t for name, t in judged.items() if name.startswith("ResidualFSQ index mismatches, torch.compile"))
    assert compiled["measured"] == "7; in kernel 7 / 0; in torch 0 / 7 of 100 elements" and compiled["goal"] == "informative"
    # step v: each variant beside its ratio, the one the cut left out said so, the mismatches named by variant
    assert judged["bound_hard_clamp: forward time over the plain forward"]["measured"] == \
        "1.05x (0.210 vs 0.200 ms); CUDA graph 1.05x (0.105 ms)"
    assert judged["return_indices=False: forward time over the plain forward"]["measured"].startswith(
        "not measured: step v timed out")
    assert judged["track_usage: forward time over the plain forward"]["measured"].startswith("+12.0% (0.224 vs 0.200 ms)")
    outputs = judged["vqp 1.32's options: output mismatches against vqp with the same options (every variant, one large input)"]
    assert outputs["measured"] == "3 over 4 variants: orthogonal_rotation 3 (max abs diff 6e-08)"
    noise = judged["noise_dropout in training: index mismatches against the same module's indices without noise"]
    assert noise["measured"] == "0 of 100 tokens (noise moved 35.0% of the values)" and noise["met"] is True
    clamp = results["steps"]["v"]["result"]["rows"][1]  # a variant whose timing raised: said, not judged
    saved = dict(clamp)
    for key in ("fsq_triton_ms", "x_plain", "cuda_graph_ms", "cuda_graph_x_plain"):
        del clamp[key]
    clamp["speed_error"] = "RuntimeError: boom"
    failed = {t["target"]: t for t in gpu_check.targets(results, judged=True)}["bound_hard_clamp: forward time over the plain forward"]
    assert failed["measured"] == "not measured: RuntimeError: boom" and failed["met"] is None
    clamp.clear()
    clamp.update(saved)
    assert judged["video bfloat16 forward: % of the copy bandwidth"]["measured"].startswith("80.0% (0.150 ms")
    assert judged["GPU tests (pytest -m gpu)"]["measured"] == "8 passed, 1 failed, 0 errors, 1 skipped"
    graph = judged["tiny call replayed from a CUDA graph: time over one elementwise PyTorch launch"]
    assert graph["measured"] == "1.20x (6.0 us vs 5.0 us; the reference's graph 9 us)" and graph["met"] is True
    results.update(mode="gpu", date="2026-11-28", command="python bench/gpu_check.py", budget_s=480, elapsed_s=300,
                   peers={"wheels": "installed", "vector_quantize_pytorch": "1.32.0"},
                   targets=list(judged.values()))
    for entry in results["steps"].values():
        entry.update(what="w", expected_s=1, limit_s=2, seconds=1.0)
    summary = gpu_check.summary_markdown(results)
    assert "NVIDIA H200" in summary and "| **no** |" in summary and "No target is judged" not in summary
    assert "## ResidualFSQ (step r)" in summary and "- forward_speedup_vs_vqp eager: 12" in summary
    assert "## vqp 1.32's options (step v): parity with vqp, time over the plain forward" in summary
    assert "| orthogonal_rotation | - | - | 0 | 3 | 6e-08 | 0.32 | 1.6 | 0.16 | 1.6 |  |" in summary

    # the same run without vqp: the vqp targets say why they are not measured, and are not judged
    del results["steps"]["d"]["result"]["rows"][0]["speedup_vs_vqp"]
    del results["steps"]["d"]["result"]["rows"][0]["fwd_bwd_speedup_vs_vqp"]
    results["steps"]["d"]["result"]["rows"][0]["vqp"] = "vector-quantize-pytorch is not importable here"
    vqp_rows = [t for t in gpu_check.targets(results, judged=True) if "vqp" in t["target"] and t["step"] == "d"]
    assert len(vqp_rows) == 2 and all(t["met"] is None and "not importable" in t["measured"] for t in vqp_rows)


def test_time_limit_plugin_samples_parametrizations_and_stops_at_its_deadline(tmp_path):
    (tmp_path / "test_many.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('k', range(7))\ndef test_p(k):\n    pass\n\n"
        "@pytest.mark.parametrize('k', range(2))\ndef test_q(k):\n    pass\n\ndef test_single():\n    pass\n")
    base = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "bench")}

    def pytest_run(**env):
        return subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "pytest_time_limit",
                               "test_many.py"], cwd=tmp_path, env={**base, **env}, capture_output=True, text=True,
                              timeout=60)

    done = pytest_run(FSQ_TRITON_TEST_SAMPLE="3")
    assert done.returncode == 0, done.stdout
    ran = [line.split(" ")[0].split("::")[1] for line in done.stdout.splitlines() if " PASSED" in line]
    assert ran == ["test_p[0]", "test_p[3]", "test_p[6]", "test_q[0]", "test_q[1]", "test_single"]  # first, middle, last
    assert "sample: kept 6 of 10 tests (at most 3 parametrizations of each test function" in done.stdout
    assert "4 deselected" in done.stdout
    done = pytest_run(FSQ_TRITON_TEST_SAMPLE="1", FSQ_TRITON_TEST_DEADLINE=str(time.time() - 1))
    assert done.returncode == 0 and "3 skipped" in done.stdout, done.stdout
    assert done.stdout.count("SKIPPED (out of time") == 3
    gpu_check = _gpu_check_module()
    log = tmp_path / "e.log"
    log.write_text(done.stdout)
    assert {outcome for _, outcome, _ in gpu_check.log_outcomes(log)} == {"skipped"}


RESIDUAL_STUB = """
import json, time
print(json.dumps({"environment": {"device": "stub GPU", "torch": "2.x"}}), flush=True)
print(json.dumps({"parity": {"semantics": "current", "elements": 20000000, "index_mismatches": 0}}), flush=True)
print(json.dumps({"speed": {"rows": {"fsq_triton": {"forward_ms": 0.5}}, "forward_over_bound": 1.2}}), flush=True)
print(json.dumps({"speed": {"rows": {"fsq_triton": {"forward_ms": 0.5}, "vqp eager": {"forward_ms": 6.0}},
                            "forward_over_bound": 1.2, "forward_speedup_vs_vqp eager": 12.0}}), flush=True)
print(json.dumps({"projected": {"module": "ResidualFSQ(dim=1024)", "parity": {"index_mismatches": 0},
                                "speed": {"rows": {"fsq_triton": {"forward_ms": 0.2}}, "forward_over_bound": 1.5}}}),
      flush=True)
print('{"speed": {"rows": {"fsq_tri', end="", flush=True)  # cut in the middle of a line
time.sleep(120)  # torch.compile of vqp, past the limit
"""


def test_residual_step_cut_at_its_limit_keeps_the_lines_it_printed(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "residual_gpu_check.py").write_text(RESIDUAL_STUB)
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    run = gpu_check.Run(tmp_path / "out", cpu=False, budget_s=100, wheels=tmp_path / "no-wheels")
    try:
        run.step(gpu_check.Step("r", "residual", "stub", expected_s=1, limit_s=5))
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    entry = run.results["steps"]["r"]
    assert entry["status"] == "timed out"
    report = entry["result"]["report"]
    assert report["device"] == "stub GPU" and [row["semantics"] for row in report["parity"]] == ["current"]
    assert list(report["speed"]["rows"]) == ["fsq_triton", "vqp eager"]  # the last complete speed line
    assert "speed rows: fsq_triton, vqp eager" in entry["result"]["notes"][-1]
    assert report["projected"]["speed"]["rows"]["fsq_triton"]["forward_ms"] == 0.2 and "grouped" not in report
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "- projected: module ResidualFSQ(dim=1024)" in summary and "  - fsq_triton: forward_ms 0.2" in summary
    judged = {t["target"]: t for t in run.results["targets"]}
    assert judged["ResidualFSQ index mismatches against vqp (current semantics, fused kernel)"]["met"] is True
    assert judged["ResidualFSQ 8x[8,5,5,5] forward speedup vs vqp eager"]["measured"] == "12.00x"
    assert judged["ResidualFSQ 8x[8,5,5,5] forward speedup vs vqp torch.compile"]["met"] is None


def test_summary_has_each_section_once_when_steps_are_run_again(tmp_path):
    """A step that runs again (or an output rewritten after each step) replaces its rows and sections, never adds."""
    gpu_check = _gpu_check_module()
    run2 = json.loads((ROOT / "bench" / "results" / "2026-11-28-h200" / "run2" / "results.json").read_text())
    run = gpu_check.Run(tmp_path / "out", cpu=False, budget_s=480, wheels=tmp_path / "no-wheels")
    try:
        run.results.update(peers=run2["peers"])
        for _ in range(3):  # steps c and d recorded again, the outputs rewritten each time
            for letter in "cd":
                run.results["steps"][letter] = json.loads(json.dumps(run2["steps"][letter]))
                run.write()
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    summary = (tmp_path / "out" / "summary.md").read_text()
    headings = [line for line in summary.splitlines() if line.startswith("## ")]
    assert headings == ["## Steps", "## Targets", "## Core speed (step c)", "## Projections and the tiny call (step d)"]
    assert summary.count("- video 32x6x32x128x128 float32 forward:") == 1
    assert summary.count("| c | core speed targets |") == 1
    # the committed run-2 summary is what this code writes from its results.json: each section once there too
    committed = (ROOT / "bench" / "results" / "2026-11-28-h200" / "run2" / "summary.md").read_text()
    assert gpu_check.summary_markdown(run2) == committed


NCU_RAW = """==PROF== Connected to process 1
"ID","Process ID","Kernel Name","gpu__time_duration.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"
"","","","usecond","%","register/thread","ratio","ratio","ratio","ratio"
"0","7","_fsq_forward_kernel","365.12","55.10","96","3.50","0.80","1.20","0"
"1","7","_fsq_forward_kernel","284.90","71.90","96","2.10","0.70","0.40","0"
"""


def test_ncu_raw_page_becomes_one_row_a_launch(tmp_path):
    """Step p's parser: the kept columns with their units, the three largest stall reasons, rows named by the
    launch order when the counts agree (else by the kernel's name)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    raw = tmp_path / "ncu-raw.csv"
    raw.write_text(NCU_RAW)
    rows = gpu_check.ncu_rows(raw, ["forward A [compile]", "forward A [profiled]"])
    assert [row["launch"] for row in rows] == ["forward A [compile]", "forward A [profiled]"]
    assert rows[1]["duration"] == "284.90 usecond" and rows[1]["dram_pct"] == "71.90 %" and rows[1]["registers"] == "96 register/thread"
    assert rows[0]["top_stalls"] == "long_scoreboard 3.50, lg_throttle 1.20, wait 0.80"
    assert [row["launch"] for row in gpu_check.ncu_rows(raw, ["only one name"])] == ["_fsq_forward_kernel"] * 2
    assert gpu_check.ncu_rows(tmp_path / "missing.csv", []) == []
    (tmp_path / "empty.csv").write_text("==ERROR== the application returned an error\n")
    assert gpu_check.ncu_rows(tmp_path / "empty.csv", []) == []
    summary = gpu_check.summary_markdown({"mode": "gpu", "date": "d", "command": "c", "elapsed_s": 1.0, "budget_s": 480,
                                          "peers": {}, "targets": [], "steps": {"p": {
                                              "what": "profile", "status": "ok", "reason": None, "seconds": 1.0,
                                              "limit_s": 60, "expected_s": 40, "result": {"rows": rows}}}})
    assert "## Profile (step p): ncu counters a launch" in summary and "| forward A [profiled] | 284.90 usecond" in summary
