#!/usr/bin/env bash
# One node, N GPUs, through the DeepSpeed launcher.
#   GPUS=8 bash launch/deepspeed_single_node.sh --config configs/methods/shaped.yaml model.n_layers=256
# On a CPU-only machine (tests, laptops) set DS_ACCELERATOR=cpu; ranks then talk over gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --num_gpus "${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}" --master_port "${MASTER_PORT:-29500}" train.py "$@"
