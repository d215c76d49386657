#!/usr/bin/env bash
# Several nodes through torchrun's c10d rendezvous: run this same command on every node.
#   NNODES=4 GPUS=8 RDZV_HOST=node001 bash launch/torchrun_multi_node.sh --config configs/X.yaml
# The checkout, the data and train.out_dir must be on a shared filesystem.
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc_per_node "${GPUS:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "${RDZV_HOST:?set RDZV_HOST to one node}:${RDZV_PORT:-29400}" \
  --rdzv_id "${RDZV_ID:-fathom}" train.py "$@"
