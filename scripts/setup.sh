#!/usr/bin/env bash
# Create .venv and install eiup. A machine with an NVIDIA GPU gets PyPI's CUDA build of torch;
# a machine without one gets the CPU build (pinned torch==2.13.0, installed before anything can
# pull the multi-GB CUDA build). `--test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="."
[ "${1:-}" = "--test" ] && extras=".[test]"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q torch
else
  # Off this workplace, add: --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e "$extras"
.venv/bin/python -c "import torch, diffusers, eiup; print('eiup ready: torch', torch.__version__, '| cuda:', torch.cuda.is_available())"
