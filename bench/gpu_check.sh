#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): OUT=gpu-results bash bench/gpu_check.sh [--cpu] [--steps abc]
exec "${PYTHON:-$(command -v python || command -v python3)}" "$(dirname "$0")/gpu_check.py" "$@"
