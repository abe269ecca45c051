#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/bnstudy bench syncbn --steps 3 --rounds 1 --out runs/bench/syncbn.json
