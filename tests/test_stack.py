"""The supported stack and the launch plumbing around the kernels (no GPU needed).

- ``TRITON_INTERPRET`` and ``FSQ_TRITON_AUTOTUNE`` are read exactly as Triton reads its own flags;
- every launch runs on its input's GPU (Triton launches on the *current* device);
- tuning never runs while a CUDA graph is being captured, and survives configurations that fail;
- a tuning cache whose entries the kernels cannot take is ignored with a warning.
"""

import json
import warnings

import pytest
import torch

import fsq_triton.ops.fsq as fsq_ops
from fsq_triton import FSQ, _mode, autotune


@pytest.mark.parametrize("value", ["1", "0", "true", "TRUE", "True", "false", "no", "off", "on", "yes", "y", "", " 1", "2"])
def test_flags_read_as_triton_reads_them(value, monkeypatch):
    from triton._C.libtriton import getenv_bool

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _mode.interpreting() == getenv_bool("TRITON_INTERPRET", False)
    monkeypatch.setenv("FSQ_TRITON_AUTOTUNE", value)
    assert autotune._tuning_enabled() == getenv_bool("FSQ_TRITON_AUTOTUNE", False)


def test_unset_flags_are_off(monkeypatch):
    monkeypatch.delenv("FSQ_TRITON_AUTOTUNE", raising=False)
    assert not autotune._tuning_enabled()


class _FakeCudaTensor:
    """Just enough of a tensor for the device guard: a device and nothing fake about it."""

    def __init__(self, index):
        self.device = torch.device("cuda", index)


def _record_device_switches(monkeypatch, current=0):
    entered = []

    class Switch:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append(("exit", self.index))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    monkeypatch.setattr(fsq_ops, "_is_fake", lambda t: False)
    return entered


def test_device_guard_switches_to_the_input_gpu(monkeypatch):
    entered = _record_device_switches(monkeypatch, current=0)
    with fsq_ops.device_guard(_FakeCudaTensor(1)):
        assert entered == [1]
    assert entered == [1, ("exit", 1)]


def test_device_guard_is_free_where_nothing_moves(monkeypatch):
    entered = _record_device_switches(monkeypatch, current=1)
    for t in (_FakeCudaTensor(1), torch.zeros(1), torch.zeros(1, device="meta")):
        with fsq_ops.device_guard(t):
            pass
    assert entered == []


def test_every_launch_goes_through_the_guard(monkeypatch):
    if not fsq_ops.interpreting():
        pytest.skip("runs the kernels under the interpreter")
    guarded = []
    real = fsq_ops.device_guard

    def spy(t):
        guarded.append(t.device)
        return real(t)

    monkeypatch.setattr(fsq_ops, "device_guard", spy)
    m = FSQ([8, 5, 5], backend="triton")
    z = torch.randn(2, 5, 3, requires_grad=True)
    out, indices = m(z)
    out.sum().backward()
    m.indices_to_codes(indices)
    assert len(guarded) == 3  # forward, backward, decode


def _tuning_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("FSQ_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FSQ_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_device_name", lambda device: "Test GPU")
    monkeypatch.setattr(autotune, "_CACHES", {})
    monkeypatch.setattr(autotune, "_DEVICE_CACHES", {})
    return _FakeCudaTensor(0)


def test_no_tuning_while_a_cuda_graph_is_captured(monkeypatch, tmp_path):
    probe = _tuning_setup(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    tuned = []
    monkeypatch.setattr(autotune, "_tune", lambda *args: tuned.append(args) or {"BLOCK_N": 64, "num_warps": 4})
    default = {"BLOCK_N": 128, "num_warps": 4}
    assert autotune.launch_config("forward", "k", default, lambda cfg: None, probe, lambda: [default]) == default
    assert tuned == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert autotune.launch_config("forward", "k", default, lambda cfg: None, probe, lambda: [default]) == {"BLOCK_N": 64, "num_warps": 4}
    assert len(tuned) == 1


def _fake_do_bench(monkeypatch):
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])


def test_tuning_survives_a_failing_default(monkeypatch, tmp_path):
    probe = _tuning_setup(monkeypatch, tmp_path)
    _fake_do_bench(monkeypatch)
    default, other = {"BLOCK_N": 128, "num_warps": 4}, {"BLOCK_N": 64, "num_warps": 4}

    def run(cfg):
        if cfg == default:
            raise RuntimeError("out of resources")

    with pytest.warns(RuntimeWarning, match="out of resources"):
        assert autotune._tune("forward", "k", default, run, probe, [default, other]) == other


def test_tuning_with_nothing_that_runs_says_so(monkeypatch, tmp_path):
    probe = _tuning_setup(monkeypatch, tmp_path)
    _fake_do_bench(monkeypatch)

    def run(cfg):
        raise RuntimeError("out of resources")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no launch configuration of forward ran"):
            autotune._tune("forward", "k", {"BLOCK_N": 128, "num_warps": 4}, run, probe, [])


@pytest.mark.parametrize("entry", [
    {"BLOCK_N": 3, "num_warps": 0},
    {"BLOCK_N": 128, "num_warps": 3},
    {"BLOCK_N": 8192, "num_warps": 4},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 0},
    {"BLOCK_N": 128, "num_warps": 4, "BLOCK_K": 32},
    {"BLOCK_N": True, "num_warps": 4},
    [128, 4],
])
def test_cache_with_an_unusable_entry_is_ignored(entry, monkeypatch, tmp_path):
    probe = _tuning_setup(monkeypatch, tmp_path)
    monkeypatch.delenv("FSQ_TRITON_AUTOTUNE")
    path = autotune.cache_path(probe.device)
    path.write_text(json.dumps({"format": autotune.CACHE_FORMAT, "file": path.name, "configs": {"k": entry}}))
    default = {"BLOCK_N": 128, "num_warps": 8}
    with pytest.warns(RuntimeWarning, match="bad entry 'k'"):
        assert autotune.launch_config("forward", "k", default, lambda cfg: None, probe, lambda: []) == default


def test_every_space_config_passes_the_check():
    for tile in (1, 8, 64, 512):
        for pipelined in (False, True):
            for cfg in autotune.config_space(tile, pipelined):
                assert autotune.config_problem(cfg) is None, cfg


def test_autotune_and_mode_sit_below_the_ops():
    """No import circle: ``autotune`` and ``_mode`` import nothing of ``fsq_triton.ops`` (which imports them)."""
    import subprocess
    import sys

    code = "import sys, fsq_triton.autotune, fsq_triton._mode; print(sorted(m for m in sys.modules if m.startswith('fsq_triton.ops')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
