#!/usr/bin/env bash
# The checks only a CUDA GPU can do (tests marked `cuda`, tests/test_gpu.py): SyncBatchNorm on CUDA under bf16 and
# fp16 autocast with 2 ranks sharing GPU 0 over gloo, auto precision, short bf16/fp16 training runs and export from
# their checkpoints. Uses the .venv when there is one, else $PYTHON (default python3) with this checkout on its path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible to torch " + torch.__version__)
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.device_count()} x {p.name}, sm_{p.major}{p.minor}, "
      f"bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}")
PY
exec "$PYTHON" -m pytest -m cuda -v -p no:cacheprovider tests/test_gpu.py "$@"
