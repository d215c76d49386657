#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher (pdsh/ssh to every host of the hostfile).
#   HOSTFILE=launch/hostfile MASTER_ADDR=node001 bash launch/deepspeed_multi_node.sh --config configs/X.yaml
# Run it on the first host. The checkout, the data and train.out_dir must be on a shared filesystem.
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE, see launch/hostfile.example}" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host}" --master_port "${MASTER_PORT:-29500}" \
  train.py "$@"
