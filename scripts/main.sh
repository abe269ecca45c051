#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job offline: train the CIFAR CNN with plain BN and with SyncBN under
# DDP (2 processes, gloo on CPU / nccl on GPU) with profiler traces, compare the runs and their traces, and export
# the SyncBN model to ONNX with BN folded and parity verified. Real CIFAR-10 is used when found ($BNSTUDY_DATA,
# ./data/cifar10, ../shared/data/cifar10), else the built-in synthetic set (with a warning).
# Outputs: runs/demo/. Knobs: EPOCHS, WIDTH, TRAIN_SUBSET, BATCH (per process), LR, NPROC, PROFILE_STEPS (steps
# recorded per run; the first epoch needs 2 more). The full recipe is
# `torchrun --nproc_per_node=2 launch/train_cifar.py` with its defaults (README: 92% in 25 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
EPOCHS=${EPOCHS:-3} WIDTH=${WIDTH:-16} TRAIN_SUBSET=${TRAIN_SUBSET:-10000} BATCH=${BATCH:-64} LR=${LR:-0.1}
NPROC=${NPROC:-2} PROFILE_STEPS=${PROFILE_STEPS:-10}
rm -rf runs/demo
for norm in bn syncbn; do
  .venv/bin/torchrun --standalone --nproc_per_node="$NPROC" launch/train_cifar.py --norm "$norm" \
    --epochs "$EPOCHS" --width "$WIDTH" --train-subset "$TRAIN_SUBSET" --batch-size "$BATCH" --lr "$LR" \
    --profile --profile-steps "$PROFILE_STEPS" --out "runs/demo/$norm"
done
.venv/bin/bnstudy compare runs/demo/bn runs/demo/syncbn --out runs/demo
.venv/bin/bnstudy trace compare runs/demo/bn runs/demo/syncbn --out runs/demo/trace-compare.json
.venv/bin/bnstudy export runs/demo/syncbn --fold-bn --out runs/demo/syncbn.onnx --report runs/demo/export.json
echo
echo "main job done: runs/demo/ (compare.png, compare.json, trace-compare.json, traces under */tb/, syncbn.onnx, export.json)"
echo "what to look at (A = bn, B = syncbn):"
.venv/bin/bnstudy report runs/demo
