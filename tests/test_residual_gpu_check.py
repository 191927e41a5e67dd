"""``scripts/residual_gpu_check.py``'s cases with projections, run in this process on tiny shapes.

Issue 12's GPU check measures ``ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=8, dim=1024)`` and the ChatTTS-like
``GroupedResidualFSQ(dim=1024, groups=2, levels=[5, 5, 5, 5], num_quantizers=2)`` on bfloat16 inputs under autocast,
against vqp. Here the same code runs on CPU tensors (the kernels under Triton's interpreter, which conftest.py turns on
without a GPU) on 16 tokens, one timed repeat, so that a GPU window is not spent on a typo: every JSON line parses, the
parity and speed rows are where the GPU check's step r reads them, and the run goes on without vqp. The ``dim4`` case
and the script as a process are run by ``test_gpu_check.py`` (step r of ``bench/gpu_check.py --cpu``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "residual_gpu_check.py"
TOKENS = 16


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("residual_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _lines(text: str) -> list[tuple[str, dict]]:
    lines = []
    for line in text.splitlines():
        item = json.loads(line)  # every line of stdout is one JSON object of one key
        assert isinstance(item, dict) and len(item) == 1, line
        lines.append(next(iter(item.items())))
    return lines


def test_projected_and_grouped_cases_against_vqp(script, capsys, tmp_path):
    pytest.importorskip("vector_quantize_pytorch")
    out = tmp_path / "residual.json"
    assert script.main(["--device", "cpu", "--cases", "projected,grouped", "--tokens", str(TOKENS), "--repeats", "1",
                        "--out", str(out)]) == 0
    lines = _lines(capsys.readouterr().out)
    # the environment, then each case after its parity, project_in alone and each timed row (no compile row on the CPU)
    assert [kind for kind, _ in lines] == ["environment"] + ["projected"] * 4 + ["grouped"] * 4
    env = lines[0][1]
    assert env["cases"] == ["projected", "grouped"] and env["tokens"] == TOKENS and env["vqp"]
    assert all(a[1]["at_s"] <= b[1]["at_s"] for a, b in zip(lines, lines[1:]))
    report = json.loads(out.read_text())  # --out: the assembled report, each case's last line
    for key, indices_per_token in (("projected", 8), ("grouped", 2 * 2)):
        case = [value for kind, value in lines if kind == key][-1]
        assert report[key] == case
        assert "errors" not in case, case["errors"]
        assert case["input"] == f"(1, {TOKENS}, 1024) bfloat16" and "autocast" in case["autocast"]
        parity = case["parity"]
        assert parity["indices"] == TOKENS * indices_per_token
        assert parity["index_mismatches"] == 0
        assert parity["quantized_dtype"] == parity["vqp_quantized_dtype"] == "bfloat16"
        assert parity["quantized_max_abs_diff"] < 0.05  # a few bfloat16 ulps of the output at most
        speed = case["speed"]
        assert list(speed["rows"]) == ["fsq_triton", "vqp eager"]
        assert all(ms > 0 for row in speed["rows"].values() for ms in row.values())
        # read x and write the output in bfloat16, 4-byte indices
        assert speed["forward_bound_bytes"] == 2 * TOKENS * 1024 * 2 + TOKENS * indices_per_token * 4
        assert speed["forward_bound_ms"] > 0 and speed["forward_over_bound"] > 0
        assert speed["forward_speedup_vs_vqp eager"] > 0 and speed["forward_backward_speedup_vs_vqp eager"] > 0
        # project_in alone: read x, write h (4 bfloat16 codebook channels a token and group)
        project_in = speed["project_in"]
        assert project_in["forward_ms"] > 0 and project_in["over_bound"] > 0
        h_bytes = TOKENS * (4 if key == "projected" else 2 * 4) * 2
        assert project_in["bound_ms"] == pytest.approx((TOKENS * 1024 * 2 + h_bytes) / (speed["copy_bandwidth_gbs"] * 1e9) * 1e3)


def test_cases_without_vqp(script, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # import raises ImportError
    assert script.main(["--device", "cpu", "--cases", "grouped", "--tokens", "8", "--repeats", "1"]) == 0
    lines = _lines(capsys.readouterr().out)
    assert [kind for kind, _ in lines] == ["environment", "grouped", "grouped", "grouped"]
    case = lines[-1][1]
    assert case["vqp"] is False and "not installed" in case["parity"]["skipped"]
    assert list(case["speed"]["rows"]) == ["fsq_triton"] and "forward_over_bound" in case["speed"]
    assert not [key for key in case["speed"] if "speedup" in key]


def test_unknown_case_is_refused(script):
    with pytest.raises(SystemExit, match="unknown case"):
        script.main(["--device", "cpu", "--cases", "dim4,projectd"])


def test_compiled_parity_counts(script):
    """``compiled_parity`` (dim4, after the compiled row on CUDA): here with eager vqp standing in for its compiled
    self, every count is 0 (on the CPU the interpreter's tanh is torch's), and the class default is restored."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    import torch

    import fsq_triton

    torch.manual_seed(0)
    ours = fsq_triton.ResidualFSQ(levels=script.LEVELS, num_quantizers=script.STAGES)
    reference = vqp.ResidualFSQ(levels=script.LEVELS, num_quantizers=script.STAGES)
    x = torch.randn(1, 64, len(script.LEVELS)) * 1.5
    counts = script.compiled_parity(x, ours, reference, reference)
    assert counts == {"elements": x.numel(), "vqp_compiled_vs_eager": 0,
                      "soft_clamp_in_kernel_vs_vqp_eager": 0, "soft_clamp_in_kernel_vs_vqp_compiled": 0,
                      "soft_clamp_in_torch_vs_vqp_eager": 0, "soft_clamp_in_torch_vs_vqp_compiled": 0}
    assert fsq_triton.ResidualFSQ.soft_clamp_in_kernel is None


def test_dim4_parity_reports_the_tanh_check(script):
    """``dim4``'s parity row (current semantics) counts index mismatches with the soft clamp where the default puts
    it and forced either way, and reports the device's tanh check: on the CPU the kernels run under the interpreter,
    whose tanh is torch's (0 of the probe's values differ, the soft clamp in the kernel by default)."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    import torch

    from conftest import interpreting

    if not interpreting():
        pytest.skip("runs the kernels under the interpreter")
    row = script.parity("current", 256, torch.device("cpu"), vqp)
    assert row["elements"] == 256 and row["index_mismatches"] == 0
    assert row["index_mismatches_soft_clamp_in_kernel"] == row["index_mismatches_soft_clamp_in_torch"] == 0
    assert row["tanh_probe_mismatches"] == row["soft_clamp_probe_mismatches"] == 0 and row["tanh_probe_values"] > 1000
    assert row["soft_clamp_in_kernel_by_default"] is True


def test_fuse_project_in_rows(script, capsys):
    """``--fuse-project-in``: the projected case also reports the opt-in module's parity and timed row."""
    pytest.importorskip("vector_quantize_pytorch")
    assert script.main(["--device", "cpu", "--cases", "projected", "--tokens", "16", "--repeats", "1",
                        "--fuse-project-in"]) == 0
    case = _lines(capsys.readouterr().out)[-1][1]
    assert "errors" not in case, case.get("errors")
    fused = case["parity"]["fuse_project_in"]
    assert fused["indices"] == 16 * 8 and 0 <= fused["index_mismatches"] <= fused["indices"]
    assert list(case["speed"]["rows"]) == ["fsq_triton", "fsq_triton fuse_project_in", "vqp eager"]
