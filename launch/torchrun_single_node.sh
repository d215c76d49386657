#!/usr/bin/env bash
# One node, N GPUs, through torchrun.
#   GPUS=8 bash launch/torchrun_single_node.sh --config configs/methods/shaped.yaml model.n_layers=256
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node "${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}" train.py "$@"
