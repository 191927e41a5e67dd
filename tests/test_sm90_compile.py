"""The real compiler's verdict, without a GPU, for whichever triton is installed (CI runs 3.9 and 3.6).

``bench/inspect_kernels.py`` compiles every kernel for Hopper (sm_90) with the ptxas and cuobjdump that the
triton wheel ships and prints one JSON object per kernel; it runs in a subprocess because this test session
runs Triton's interpreter, whose kernels cannot be compiled. The goals asserted here:

- every kernel: no spills (``ptxas -v``), at most 255 registers;
- every streaming kernel (forward, backward, decode; float32, bfloat16, float16; channel-first and
  channel-last): no shared memory, no barriers, and registers for at least two resident blocks per SM;
- 128-bit global accesses where the layout allows them: float32 rows and tiles, the channel-last tiles of
  2-byte dtypes (their channel-first rows hold 4 tokens a thread, 64-bit accesses, so that the int32 index
  row shares their layout; a warp still moves whole 256-byte segments);
- the bfloat16 projections on tensor cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "inspect_kernels.py"
FIELDS = {"name", "registers", "spill_bytes", "shared_bytes", "barriers", "ldg128", "stg128"}
STREAMING = [(kind, dtype, layout) for kind in ("forward", "backward", "decode") for dtype in ("fp32", "bf16", "fp16")
             for layout in ("channel-first", "channel-last")]


@pytest.fixture(scope="module")
def rows():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), "90", "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {row["name"]: row for row in parsed}


def test_json_lines_have_the_fields(rows):
    assert len(rows) == len(STREAMING) + 4
    for row in rows.values():
        assert FIELDS <= row.keys(), row


def test_no_kernel_spills(rows):
    for name, row in rows.items():
        assert row["spill_bytes"] == 0, f"{name} spills: {row}"
        assert row["registers"] <= 255, name


@pytest.mark.parametrize("kind,dtype,layout", STREAMING)
def test_streaming_kernel_is_lean(rows, kind, dtype, layout):
    row = rows[f"{kind} {dtype} {layout}"]
    assert row["shared_bytes"] == 0, row
    assert row["barriers"] == 0, row
    assert row["blocks_per_sm"] >= 2, row
    wide_rows = dtype == "fp32" or layout == "channel-last" or kind == "backward"
    if kind != "decode" and wide_rows:
        assert row["ldg128"] > 0, row
    if wide_rows:
        assert row["stg128"] > 0, row


def test_large_levels_forward_is_lean(rows):
    row = rows["forward fp32, 64-bit offsets, levels 100"]
    assert row["shared_bytes"] == 0 and row["barriers"] == 0 and row["blocks_per_sm"] >= 2, row


def test_bf16_projections_run_on_tensor_cores(rows):
    assert rows["projected forward bf16 channel-last, dim 1024"]["mma"] > 0
    assert rows["projected decode bf16, 2 codebooks"]["mma"] > 0
