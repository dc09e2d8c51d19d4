#!/usr/bin/env bash
# Create .venv (if missing) and install edge-llm with the export and test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edge-llm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned, and the CPU build: PyPI's Linux wheel pulls ~20 CUDA packages (GBs).
  # install_torch.py checks with a dry run and switches to PyTorch's CPU index when needed;
  # EDGE_LLM_TORCH_INDEX=URL (a CUDA index) or =default chooses otherwise.
  .venv/bin/python scripts/install_torch.py "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[export,test]"
  touch "$stamp"
fi
