#!/usr/bin/env bash
# Create .venv (if missing) and install bnstudy with its dev extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # torch first and pinned: an unpinned resolve would pick whatever torch the index has newest.
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
