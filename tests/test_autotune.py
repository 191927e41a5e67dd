"""Autotuning: every configuration computes the same thing, and the cache survives what disks do to it."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fsq_triton.ops.fsq as fsq_ops
import fsq_triton.ops.fsq_projected as projected_ops
from fsq_triton import FSQ, autotune


def _run(m, z, g):
    z = z.detach().clone().requires_grad_()
    out, indices = m(z)
    out.backward(g)
    return out.detach(), indices, z.grad, m.indices_to_codes(indices)


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(levels=[8, 5, 5, 5]), (2, 4, 3, 20)),
        (dict(levels=[8, 5, 5, 5], num_codebooks=2), (2, 45, 8)),
        (dict(levels=[7, 5, 3], dim=24), (2, 30, 24)),
    ],
)
def test_every_configuration_gives_identical_results(kwargs, shape, monkeypatch):
    if not fsq_ops.interpreting():
        pytest.skip("runs the kernels under the interpreter")
    torch.manual_seed(0)
    m = FSQ(**kwargs, backend="triton")
    z, g = torch.randn(shape) * 2, torch.randn(shape)
    expected = _run(m, z, g)
    channel_tiles = {4 * 2, 16 * 1, 64}  # padded channel tiles these modules launch with (and the projected BLOCK_K)
    space = {
        tuple(sorted(cfg.items()))
        for tile in channel_tiles for pipelined in (False, True) for cfg in autotune.config_space(tile, pipelined)
    }
    assert len(space) > 8
    for cfg in sorted(space):
        with autotune.forced_config(dict(cfg)):
            got = _run(m, z, g)
        assert torch.equal(got[1], expected[1]), cfg
        for a, b in zip(got, expected):
            assert torch.equal(a, b), cfg


def test_default_config_is_in_a_sane_range():
    for tile in (8, 16, 64, 128):
        for tokens in (1, 100, 10**6):
            cfg = autotune.default_config(tile, tokens)
            assert 16 <= cfg["BLOCK_N"] <= 2048 and cfg["num_warps"] in (4, 8)
            assert cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) == 0


def test_channel_first_forward_default_is_the_measured_one():
    """The H200 sweep (2026-11-28): the channel-first forward fastest at 4 warps with 256 tokens of 8 channels for
    4-byte inputs and 1024 for 2-byte ones; the other kernels and layouts, and the interpreter, keep the heuristic."""
    tokens = 1 << 24
    assert autotune.default_config(8, tokens, kernel="forward", element_size=4, channels_last=False) == {"BLOCK_N": 256, "num_warps": 4}
    assert autotune.default_config(8, tokens, kernel="forward", element_size=2, channels_last=False) == {"BLOCK_N": 1024, "num_warps": 4}
    heuristic = autotune.default_config(8, tokens)
    assert heuristic == {"BLOCK_N": 1024, "num_warps": 8}
    for kwargs in (dict(kernel="forward", channels_last=True), dict(kernel="backward", channels_last=False),
                   dict(kernel="decode", channels_last=False)):
        assert autotune.default_config(8, tokens, element_size=4, **kwargs) == heuristic, kwargs
    assert autotune.default_config(8, tokens, True, kernel="forward", element_size=4, channels_last=False) == \
        autotune.default_config(8, tokens, True)


def test_problem_key_separates_classes():
    keys = {
        autotune.problem_key("forward", 5000, 8, torch.float32, False),
        autotune.problem_key("forward", 5000, 8, torch.bfloat16, False),
        autotune.problem_key("forward", 5000, 8, torch.float32, True),
        autotune.problem_key("forward", 500000, 8, torch.float32, False),
        autotune.problem_key("backward", 5000, 8, torch.float32, False),
    }
    assert len(keys) == 5
    assert autotune.problem_key("forward", 3000, 8, torch.float32, False) == autotune.problem_key(
        "forward", 4000, 8, torch.float32, False
    )


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FSQ_TRITON_CACHE_DIR", str(tmp_path))
    autotune._CACHES.clear()
    autotune._DEVICE_CACHES.clear()
    yield tmp_path
    autotune._CACHES.clear()
    autotune._DEVICE_CACHES.clear()


DEVICE = torch.device("cpu")


def test_cache_round_trip(cache_dir):
    path = autotune.cache_path(DEVICE)
    assert path.parent == cache_dir
    autotune._write(path, {"forward|t1024|ch8|float32|cf": {"BLOCK_N": 256, "num_warps": 4}})
    autotune._write(path, {"backward|t1024|ch8|float32|cf": {"BLOCK_N": 512, "num_warps": 8}})  # merges
    configs = autotune._read(path)
    assert configs == {
        "forward|t1024|ch8|float32|cf": {"BLOCK_N": 256, "num_warps": 4},
        "backward|t1024|ch8|float32|cf": {"BLOCK_N": 512, "num_warps": 8},
    }
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]  # atomic writes leave no debris
    autotune.clear_cache(DEVICE)
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"format": 1, "file": "some-other-gpu.json", "configs": {}}),
        json.dumps({"format": 99, "configs": {}}),
        json.dumps({"format": 1, "file": "PLACEHOLDER", "configs": {"k": {"BLOCK_N": "big"}}}),
        "",
    ],
    ids=["corrupt", "foreign", "future-format", "bad-entry", "empty"],
)
def test_bad_cache_is_ignored_with_a_warning(cache_dir, content):
    path = autotune.cache_path(DEVICE)
    path.write_text(content.replace("PLACEHOLDER", path.name))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert autotune._read(path) == {}
    # and writing over it recovers a valid cache
    autotune._write(path, {"k|t1024|ch8|float32|cf": {"BLOCK_N": 64, "num_warps": 2}})
    assert autotune._read(path) == {"k|t1024|ch8|float32|cf": {"BLOCK_N": 64, "num_warps": 2}}


def test_autotune_without_gpu_exits_2():
    if torch.cuda.is_available() and not fsq_ops.interpreting():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(
        [sys.executable, "-m", "fsq_triton", "autotune", "--quick"],
        capture_output=True, text=True, env={**os.environ}, timeout=120,
    )
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


def test_offsets_64_bit_path_matches(monkeypatch):
    """The OFFSET_64 variant (taken for tensors past 2**31 elements) computes the same results."""
    if not fsq_ops.interpreting():
        pytest.skip("runs the kernels under the interpreter")
    torch.manual_seed(3)
    cases = [
        (dict(levels=[8, 5, 5, 5]), (2, 4, 5, 6)),
        (dict(levels=[8, 5, 5, 5], num_codebooks=2), (2, 7, 8)),
        (dict(levels=[8, 5, 5], dim=20), (2, 20, 3, 3)),
    ]
    for kwargs, shape in cases:
        m = FSQ(**kwargs, backend="triton")
        z, g = torch.randn(shape) * 2, torch.randn(shape)
        expected = _run(m, z, g)
        monkeypatch.setattr(fsq_ops, "_needs_int64", lambda *t: True)
        monkeypatch.setattr(projected_ops, "_needs_int64", lambda *t: True)
        got = _run(m, z, g)
        monkeypatch.undo()
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def _hammer(args):
    directory, worker = args
    os.environ["FSQ_TRITON_CACHE_DIR"] = directory
    path = autotune.cache_path(DEVICE)
    for i in range(40):
        autotune._write(path, {f"w{worker}|{i}": {"BLOCK_N": 64, "num_warps": 4}})


def test_concurrent_writers_never_corrupt_the_cache(cache_dir):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_hammer, [(str(cache_dir), 0), (str(cache_dir), 1)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt file would warn
        configs = autotune._read(autotune.cache_path(DEVICE))
    assert configs and all(cfg == {"BLOCK_N": 64, "num_warps": 4} for cfg in configs.values())
    assert {"w0|39", "w1|39"} & set(configs)  # the last writer's final entry is there
