"""Launch configurations for the kernels: a heuristic default, a per-GPU cache, and the tuner.

Each launch asks :func:`launch_config` for its configuration (``BLOCK_N`` tokens per program and
``num_warps``), keyed by a *problem class*: the kernel, a power-of-two bucket of the token count,
the padded channel tile, the dtype and the layout. The answer comes from, in order:

1. a configuration forced by :func:`forced_config` (tests use it to run every configuration);
2. the tuner, when tuning is on (``FSQ_TRITON_AUTOTUNE=1``, or ``python -m fsq_triton autotune``)
   and this class has no cached result (or a re-tune is forced): it times every configuration of
   the kernel's space with ``triton.testing.do_bench`` on the real arguments and keeps the fastest
   (``autotune --quick`` times only :func:`quick_space`: a few configurations and the default);
3. the cache of earlier tuning on this GPU model and Triton version, a JSON file under
   ``$FSQ_TRITON_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fsq_triton`` or ``~/.cache/fsq_triton``),
   read once per process; a corrupt or foreign file is ignored with a warning;
4. the heuristic default, about 8K elements a tile (``tokens * padded channels``), except where a GPU
   measurement chose another (:data:`CHANNEL_FIRST_FORWARD_TILE`).

So the first call never spends time tuning unless asked. (That is why the tuner is not the
``triton.autotune`` decorator, which times every configuration on the first call of each key and keeps
the results in memory or in Triton's own cache; the timing is the same, ``triton.testing.do_bench``.) Writes are atomic (a temporary file and
``os.replace``) after merging with what is on disk, so processes that tune at once cannot corrupt
the cache; the last writer's entries win for a class both tuned.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

from ._mode import env_flag, interpreting

CACHE_FORMAT = 1
_LOCK = threading.Lock()
_CACHES: dict[str, dict[str, dict]] = {}  # cache file path -> {problem key: config}
_DEVICE_CACHES: dict[torch.device, dict[str, dict]] = {}  # the same dicts by device: one lookup per launch
_FORCED: list[dict] = []
_RETUNE: list[bool] = []
_TUNED_LOG: list[dict] = []  # what the tuner chose in this process, for the command line report
_QUICK: list[bool] = []  # inside quick_tuning(): the tuner times quick_space(), not the whole space

# The space each kernel is tuned over: tokens per program x warps (tiles capped at 16K elements).
BLOCK_NS = (64, 128, 256, 512, 1024, 2048)
NUM_WARPS = (2, 4, 8, 16)
NUM_STAGES = (2, 3, 4)
MAX_TILE = 16384
# ``autotune --quick``: 4 warps and 256 or 1024 tokens a program, beside the default (BLOCK_N 1024, 8 warps for the
# quick shapes' 8-channel tiles). Measured on an H200 (triton 3.6, 2026-11-28, bench/results/2026-11-28-h200/run2/
# sweep.json, the 32x6x32x128x128 video): the fastest forward was 256/4 in float32 and 1024/4 in bfloat16, and 256/4
# came within 1% of the fastest backward (256/8); 512/4 was never the fastest. Each configuration costs a Triton
# compile (about 0.5 s on that machine: the full space of one quick shape, 3 kernels x 23 configurations, took 35 s).
QUICK_BLOCK_NS = (256, 1024)
QUICK_NUM_WARPS = (4,)
QUICK_NUM_STAGES = (3,)  # the pipelined kernels: Triton's default depth


def config_space(channel_tile: int, pipelined: bool = False) -> list[dict]:
    """Every configuration worth timing for a tile of ``channel_tile`` padded channels (or ``BLOCK_K`` features).

    ``pipelined`` kernels (the fused projections, which loop over the features) also try software-pipelining
    depths (``num_stages``); the quantizer kernels have no loop to pipeline.
    """
    space = []
    for block_n in BLOCK_NS:
        elems = block_n * channel_tile
        if elems > MAX_TILE:
            continue
        for warps in NUM_WARPS:
            if warps * 32 * 2 <= elems:  # at least two elements a thread
                if pipelined:
                    space += [{"BLOCK_N": block_n, "num_warps": warps, "num_stages": s} for s in NUM_STAGES]
                else:
                    space.append({"BLOCK_N": block_n, "num_warps": warps})
    return space


def quick_space(space: list[dict], default: dict) -> list[dict]:
    """The configurations ``autotune --quick`` times: those of ``space`` with :data:`QUICK_BLOCK_NS` tokens a program
    and :data:`QUICK_NUM_WARPS` warps (pipelined kernels: :data:`QUICK_NUM_STAGES`), then the default.

    A wide channel tile that leaves none of them keeps the two largest 4-warp tiles of ``space`` instead.
    """
    def stages_ok(cfg):
        return cfg.get("num_stages", QUICK_NUM_STAGES[0]) in QUICK_NUM_STAGES

    quick = [cfg for cfg in space
             if cfg["BLOCK_N"] in QUICK_BLOCK_NS and cfg["num_warps"] in QUICK_NUM_WARPS and stages_ok(cfg)]
    if not quick:
        quick = [cfg for cfg in space if cfg["num_warps"] in QUICK_NUM_WARPS and stages_ok(cfg)][-2:]
    return [cfg for cfg in quick if cfg != default] + [default]


# The channel-first forward's default, measured (bench/config_sweep.py on an H200, triton 3.6, 2026-11-28: the video
# case 32x6x32x128x128, levels [8,8,8,5,5,5]): 4 warps, and about 2K elements a tile for 4-byte inputs (256 tokens
# x 8 channels: 0.285 ms against 0.365 ms at 1024 x 8 warps) or 8K for 2-byte ones (1024 tokens: 0.197 ms
# against 0.316). Measured for that kernel and layout only; the others keep the general heuristic.
CHANNEL_FIRST_FORWARD_TILE = {4: 2048, 2: 8192}


@functools.lru_cache(maxsize=4096)
def default_config(channel_tile: int, tokens: int, interpreter: bool = False, *, kernel: str = "",
                   element_size: int = 4, channels_last: bool = True) -> dict:
    """The heuristic: about 8K elements a tile (4K under the interpreter), 8 warps from 4K elements up; the
    channel-first forward (``kernel="forward"``, ``channels_last=False``) on a GPU: the measured
    :data:`CHANNEL_FIRST_FORWARD_TILE` elements a tile for its ``element_size``, 4 warps."""
    measured = kernel == "forward" and not channels_last and not interpreter
    budget = CHANNEL_FIRST_FORWARD_TILE.get(element_size, 8192) if measured else 4096 if interpreter else 8192
    tokens = int(tokens)  # a SymInt while torch.compile traces: specialise, the choice is per size class anyway
    block = max(1, budget // channel_tile)
    block = 1 << (block.bit_length() - 1)  # power of two at or below
    block = max(16, min(block, 2048, 1 << max(0, (max(tokens, 1) - 1).bit_length())))
    warps = 4 if measured else 8 if block * channel_tile >= 4096 else 4
    return {"BLOCK_N": block, "num_warps": warps}


@functools.lru_cache(maxsize=4096)
def problem_key(kernel: str, tokens: int, channel_tile: int, dtype: torch.dtype, channels_last: bool) -> str:
    bucket = 1 << max(10, min(26, (max(int(tokens), 1) - 1).bit_length()))
    layout = "cl" if channels_last else "cf"
    return f"{kernel}|t{bucket}|ch{channel_tile}|{str(dtype).replace('torch.', '')}|{layout}"


# ------------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    env = os.environ.get("FSQ_TRITON_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fsq_triton"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"


def cache_path(device: torch.device) -> Path:
    import triton

    name = "".join(ch if ch.isalnum() else "_" for ch in _device_name(device))
    return cache_dir() / f"{name}-triton{triton.__version__}.json"


def _read(path: Path) -> dict[str, dict]:
    """The configs in ``path``, or {} (with a warning) when it is missing, corrupt or for another device."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("file") != path.name:
            raise ValueError("not an fsq_triton tuning cache for this GPU and Triton version")
        configs = data["configs"]
        if not isinstance(configs, dict):
            raise ValueError("'configs' is not a mapping")
        for key, cfg in configs.items():
            problem = config_problem(cfg)
            if problem:
                raise ValueError(f"bad entry {key!r}: {problem}")
        return configs
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is ignored, never fatal
        warnings.warn(f"fsq_triton: ignoring the tuning cache {path}: {exc}", RuntimeWarning, stacklevel=3)
        return {}


def _power_of_two(v: object, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high and v & (v - 1) == 0


def config_problem(cfg: object) -> str | None:
    """Why ``cfg`` is not a launch configuration the kernels can take, or None when it is.

    ``BLOCK_N`` a power of two in [16, 4096] (tokens per program: a tile dimension), ``num_warps`` a power of
    two in [1, 32], ``num_stages`` (optional) an int in [1, 8], and no other keys.
    """
    if not isinstance(cfg, dict):
        return f"expected a mapping, found {type(cfg).__name__}"
    extra = set(cfg) - {"BLOCK_N", "num_warps", "num_stages"}
    if extra:
        return f"unknown keys {sorted(extra)}"
    if not _power_of_two(cfg.get("BLOCK_N"), 16, 4096):
        return f"BLOCK_N must be a power of two in [16, 4096], found {cfg.get('BLOCK_N')!r}"
    if not _power_of_two(cfg.get("num_warps"), 1, 32):
        return f"num_warps must be a power of two in [1, 32], found {cfg.get('num_warps')!r}"
    stages = cfg.get("num_stages", 1)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
        return f"num_stages must be an int in [1, 8], found {stages!r}"
    return None


def _write(path: Path, new: dict[str, dict]) -> None:
    """Merge ``new`` into the file at ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = {**_read(path), **new}
    payload = {"format": CACHE_FORMAT, "file": path.name, "configs": merged}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cached(device: torch.device) -> dict[str, dict]:
    configs = _DEVICE_CACHES.get(device)
    if configs is None:
        path = str(cache_path(device))
        with _LOCK:
            configs = _CACHES.setdefault(path, _read(Path(path)))
            _DEVICE_CACHES[device] = configs
    return configs


def clear_cache(device: torch.device) -> Path:
    """Delete this device's cache file (and forget it in this process)."""
    path = cache_path(device)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _CACHES.pop(str(path), None)
    _DEVICE_CACHES.pop(device, None)
    return path


# ------------------------------------------------------------------------------------------------
# Choosing a configuration at launch
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pushed(stack: list, value) -> Iterator[None]:
    """``value`` on top of ``stack`` for the duration of the ``with`` block (the switches below nest)."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def forced_config(config: dict) -> contextlib.AbstractContextManager[None]:
    """Every launch inside uses ``config`` (for tests that run the whole space)."""
    return _pushed(_FORCED, config)


def retuning() -> contextlib.AbstractContextManager[None]:
    """Every launch inside is tuned (again) and the result persisted: what ``python -m fsq_triton autotune`` does."""
    return _pushed(_RETUNE, True)


def quick_tuning() -> contextlib.AbstractContextManager[None]:
    """Every tuning inside times only :func:`quick_space` (``python -m fsq_triton autotune --quick``)."""
    return _pushed(_QUICK, True)


def _tuning_enabled() -> bool:
    return bool(_RETUNE) or env_flag("FSQ_TRITON_AUTOTUNE")


def launch_config(kernel: str, key: str, default: dict, run: Callable[[dict], None], probe: torch.Tensor,
                  space: Callable[[], list[dict]]) -> dict:
    """The configuration for one launch (see the module docstring for the order of sources).

    ``run(config)`` launches the kernel with ``config`` (idempotent: it rewrites the same outputs);
    ``probe`` is one of the launch's tensors (its device names the cache; fake tensors never tune);
    ``space()`` lists the configurations the tuner may time.
    """
    if _FORCED:
        return _FORCED[-1]
    if probe.device.type != "cuda":  # the interpreter: no GPU to tune for or cache by
        return default
    cached = _cached(probe.device).get(key)
    if _tuning_enabled() and (cached is None or _RETUNE) and not _is_traced(probe) and not _capturing():
        return _tune(kernel, key, default, run, probe, quick_space(space(), default) if _QUICK else space())
    return cached or default


def _capturing() -> bool:
    """Whether a CUDA graph is being captured: timing there would sync and allocate inside the capture."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _is_traced(t: torch.Tensor) -> bool:
    return is_fake(t) or torch.compiler.is_compiling()


def _tune(kernel, key, default, run, probe, space: list[dict]) -> dict:
    from triton.testing import do_bench

    if default not in space:
        space.append(default)
    timings = []
    for cfg in space:
        try:
            ms = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a configuration that fails to compile or launch is skipped
            warnings.warn(f"fsq_triton: {kernel} config {cfg} failed: {exc}", RuntimeWarning, stacklevel=2)
            continue
        timings.append((ms, cfg))
    if not timings:
        raise RuntimeError(f"fsq_triton: no launch configuration of {kernel} ran for {key} (see the warnings above)")
    best_ms, best = min(timings, key=lambda t: t[0])
    default_ms = next((ms for ms, cfg in timings if cfg == default), float("nan"))  # NaN: the default failed
    path = cache_path(probe.device)
    configs = _cached(probe.device)  # outside the lock: a first read takes it
    with _LOCK:
        configs[key] = best
        _write(path, {key: best})
    _TUNED_LOG.append({"key": key, "config": best, "ms": best_ms, "default": default, "default_ms": default_ms})
    return best


# ------------------------------------------------------------------------------------------------
# python -m fsq_triton autotune
# ------------------------------------------------------------------------------------------------


def standard_workloads(quick: bool) -> list[dict]:
    """The shapes tuned by the command line: the benchmark's workloads (channel-first videos and images,
    channel-last sequences, two codebooks), in float32 and bfloat16."""
    work = [
        {"levels": [8, 8, 8, 5, 5, 5], "shape": (8, 6, 16, 64, 64), "dtype": torch.float32},
        {"levels": [8, 8, 8, 5, 5, 5], "shape": (8, 6, 16, 64, 64), "dtype": torch.bfloat16},
        {"levels": [8, 5, 5, 5, 5], "shape": (64, 5, 32, 32), "dtype": torch.float32},
        {"levels": [8, 5, 5, 5], "shape": (16, 4096, 8), "dtype": torch.float32, "num_codebooks": 2},
    ]
    if not quick:
        work += [
            {"levels": [8, 8, 8, 5, 5, 5], "shape": (32, 6, 32, 128, 128), "dtype": torch.float32},
            {"levels": [8, 8, 8, 5, 5, 5], "shape": (32, 6, 32, 128, 128), "dtype": torch.bfloat16},
            {"levels": [8, 5, 5, 5], "shape": (64, 4096, 4), "dtype": torch.bfloat16},
        ]
    return work


def main(quick: bool = False, reset: bool = False) -> int:
    """Tune the standard shapes on this GPU; print each choice and its gain over the default. Exit status 2 without a GPU.

    ``quick``: the four small shapes of :func:`standard_workloads`, each kernel timed over :func:`quick_space` only.
    """
    if not torch.cuda.is_available() or interpreting():
        print("fsq_triton autotune needs a CUDA GPU (and TRITON_INTERPRET unset): nothing to tune here.", file=sys.stderr)
        return 2
    from . import FSQ

    device = torch.device("cuda", torch.cuda.current_device())
    if reset:
        print(f"cleared {clear_cache(device)}")
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety
        tqdm = None
    work = standard_workloads(quick)
    bar = tqdm(work, desc="autotune", unit="shape") if tqdm else work
    _TUNED_LOG.clear()
    for w in bar:
        fsq = FSQ(w["levels"], num_codebooks=w.get("num_codebooks", 1)).to(device)
        z = torch.randn(w["shape"], device=device, dtype=w["dtype"], requires_grad=True)
        with retuning(), quick_tuning() if quick else contextlib.nullcontext():
            out, indices = fsq(z)
            out.backward(torch.randn_like(out))
            fsq.indices_to_codes(indices)
        torch.cuda.synchronize()
    print(f"\n{'problem class':<48} {'chosen':<24} {'ms':>8} {'default ms':>11} {'gain':>6}")
    for row in _TUNED_LOG:
        cfg = " ".join(f"{k}={v}" for k, v in row["config"].items())
        gain = row["default_ms"] / row["ms"]
        print(f"{row['key']:<48} {cfg:<24} {row['ms']:8.4f} {row['default_ms']:11.4f} {gain:5.2f}x")
    print(f"\ncache: {cache_path(device)}")
    return 0
