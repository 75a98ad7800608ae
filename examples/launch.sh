#!/usr/bin/env bash
# Multi-node launch of one PRISM stage with torchrun.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 examples/launch.sh sft examples/qwen3vl_8b/sft.yaml [key=value ...]
# Every node runs the same command with its own NODE_RANK.
set -euo pipefail
stage=$1; config=$2; shift 2
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m prism_megatron.cli "$stage" "$config" "$@"
