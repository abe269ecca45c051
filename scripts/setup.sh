#!/usr/bin/env bash
# Create .venv (if missing) and install bnstudy with its dev extra. Safe to run again. One line per step; a failing
# step prints its log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG=$(mktemp -t bnstudy-setup.XXXXXX)
trap 'rm -f "$LOG"' EXIT

step() {  # step "what" command...
  local what=$1
  shift
  printf 'setup: %s ... ' "$what"
  if "$@" >"$LOG" 2>&1; then
    echo ok
  else
    echo FAILED
    cat "$LOG" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  step "create .venv" "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # torch first and pinned: an unpinned resolve would pick whatever torch the index has newest.
  step "upgrade pip" .venv/bin/python -m pip install --quiet --upgrade pip
  step "install torch 2.14.1 + torchvision 0.29.1" .venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
step "install bnstudy[dev] (editable)" .venv/bin/python -m pip install --quiet -e ".[dev]"
