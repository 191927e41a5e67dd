#!/usr/bin/env bash
# The GPU machines' stack, tested without a GPU: torch 2.11 and triton 3.6 (what the H100/H200 machines and
# most CUDA installs of torch 2.11 run), in a throwaway venv, the whole suite under Triton's interpreter plus
# the sm_90 compile inspection with triton 3.6's own ptxas. pyproject's floor (torch>=2.11, triton>=3.6) is
# this stack; .ci/run tests the newest one (torch 2.13 CPU + triton 3.9) with README's test command.
# PyPI serves torch 2.11 only as its CUDA build (about 3 GB with the nvidia-* wheels, about a minute to
# install here); it imports and runs on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
VENV=${FSQ_STACK_VENV:-${TMPDIR:-/tmp}/fsq-stack-torch2.11}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "torch==2.11.*" "triton==3.6.*"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -c "import torch, triton, numpy; print(f'GPU machines stack: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider
