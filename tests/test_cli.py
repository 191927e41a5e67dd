"""The command line (``python -m fsq_triton``, installed as ``fsq-triton``): names, clear errors, files written.

The commands run in subprocesses from a temporary folder, as a user would run them; the package comes from
this checkout (``PYTHONPATH``). A GPU-less machine is what CI has, so the ``--device cuda`` errors are tested
where CUDA is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsq_triton.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "fsq_triton", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_names_python_m_when_run_as_a_module(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m fsq_triton ")


def test_help_names_the_installed_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/fsq-triton", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fsq-triton ") and "python -m fsq_triton" not in out.splitlines()[0]


SCRIPT = Path(sys.executable).parent / "fsq-triton"


@pytest.mark.skipif(not SCRIPT.is_file(), reason="fsq-triton is not installed beside this Python (pip install -e .)")
def test_installed_script_help_names_itself(tmp_path):
    result = subprocess.run([str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fsq-triton ")


@no_cuda
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, command):
    result = run_cli(command, "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: {command} --device cuda asked for, but CUDA is not available" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_without_its_extra_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails, as where the extra is not installed
    assert main(["bench", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tqdm" in err and 'pip install "fsq_triton[bench]"' in err
    assert not (tmp_path / "out").exists()


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--threads", "0"])
    assert exit_info.value.code == 2
    assert "argument --threads: must be at least 1, found 0" in capsys.readouterr().err


def test_quick_and_smoke_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--smoke"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_demo_runs_on_cpu(tmp_path):
    result = run_cli("demo", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "device cpu, levels [8, 8, 8, 5, 5, 5], codebook size 64000" in result.stdout
    assert "indices (2, 4, 32, 32) torch.int32" in result.stdout


def test_bench_smoke_writes_its_three_files_from_another_folder(tmp_path):
    result = run_cli("bench", "--smoke", "--device", "cpu", "--out", "results", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "results"
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["device_type"] == "cpu"
    assert results["environment"]["command"].startswith("python -m fsq_triton bench --smoke")
    assert results["environment"]["cpu_threads"] == 1  # the CPU default (--threads)
    names = [case["name"] for case in results["cases"]]
    assert names[:4] == ["image", "video", "sequence+proj", "two-codebooks"]  # then option and ResidualFSQ cases
    for k, case in enumerate(results["cases"]):
        for mode in ("inference", "training", "decode"):
            entries = case["modes"][mode]["results"]
            assert "fsq_triton" in entries and (k >= 4 or "reference" in entries), (case["label"], mode)
            for name, entry in entries.items():
                assert entry["error"] is None and entry["median_ms"] > 0, (case["label"], mode, name, entry)
        assert case["modes"]["inference"]["results"]["fsq_triton"].get("index_mismatches", 0) == 0
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# FSQ benchmark") and "| image 2x5x8x8 float32 | inference |" in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_no_compile_reaches_the_harness(monkeypatch):
    from fsq_triton.bench import harness

    calls = []
    monkeypatch.setattr(harness, "run", lambda **kwargs: calls.append(kwargs) or 0)
    assert main(["bench", "--quick", "--no-compile", "--device", "cpu"]) == 0
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    assert [call["compiled"] for call in calls] == [False, True] and calls[0]["quick"]


# ----------------------------------------------------------------------------------------------- autotune --quick

def test_autotune_quick_space_is_a_few_configurations_and_the_default():
    from fsq_triton import autotune

    # the quick shapes' kernels all launch with 8-channel tiles and more than 1024 tokens: default BLOCK_N 1024, 8 warps
    default = autotune.default_config(8, 65536)
    assert autotune.quick_space(autotune.config_space(8), default) == [
        {"BLOCK_N": 256, "num_warps": 4}, {"BLOCK_N": 1024, "num_warps": 4}, {"BLOCK_N": 1024, "num_warps": 8}]
    for tile in (4, 8, 16, 64, 128, 256, 1024):
        for pipelined in (False, True):
            for tokens in (100, 65536):
                space, default = autotune.config_space(tile, pipelined), autotune.default_config(tile, tokens)
                quick = autotune.quick_space(space, default)
                assert 1 <= len(quick) <= 3 and quick[-1] == default, (tile, pipelined, tokens, quick)
                assert all(cfg in space for cfg in quick[:-1]) and len(quick) >= min(2, len(space) + 1)
                assert all(autotune.config_problem(cfg) is None for cfg in quick)


def test_autotune_quick_tunes_over_the_quick_space_only(monkeypatch):
    """The wiring, without a GPU: a launch that tunes under quick_tuning() hands the tuner the quick space."""
    from fsq_triton import autotune

    class Probe:  # what launch_config reads of a launch's tensor: its device
        device = torch.device("cuda", 0)

    timed = []
    monkeypatch.setattr(autotune, "_cached", lambda device: {})
    monkeypatch.setattr(autotune, "_is_traced", lambda probe: False)
    monkeypatch.setattr(autotune, "_capturing", lambda: False)
    monkeypatch.setattr(autotune, "_tune", lambda kernel, key, default, run, probe, space: timed.append(space) or default)
    default = autotune.default_config(8, 65536)
    space = lambda: autotune.config_space(8)  # noqa: E731
    with autotune.retuning():
        autotune.launch_config("forward", "k", default, None, Probe(), space)
        with autotune.quick_tuning():
            autotune.launch_config("forward", "k", default, None, Probe(), space)
        autotune.launch_config("forward", "k", default, None, Probe(), space)
    assert [len(s) for s in timed] == [len(autotune.config_space(8)), 3, len(autotune.config_space(8))]
    assert len(timed[0]) > 20  # the full space of an 8-channel tile: 23 configurations


def test_autotune_quick_help_says_what_it_tunes(capsys):
    with pytest.raises(SystemExit):
        main(["autotune", "--help"])
    assert "at most 3 configurations" in " ".join(capsys.readouterr().out.split())
