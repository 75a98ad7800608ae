#!/usr/bin/env bash
# Per-node part of train.sbatch (one srun task per node): torchrun with examples/launch.sh's
# conventions (NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT; the node rank from Slurm).
# USR1 / TERM / INT go straight to the training processes (torchrun's children). torchrun turns
# a worker's exit code 75 into 1, so the code is restored from <run_dir>/preempted.json.
set -uo pipefail
stage=$1; config=$2; shift 2
PYTHON=${PYTHON:-python}
"$PYTHON" -m torch.distributed.run --nnodes "${NNODES:-1}" --node_rank "${SLURM_NODEID:-0}" \
  --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m prism_megatron.cli "$stage" "$config" "$@" &
torchrun_pid=$!
to_workers() { pkill -USR1 -P "$torchrun_pid" 2>/dev/null; }
trap to_workers USR1 TERM INT
wait "$torchrun_pid"; rc=$?
while kill -0 "$torchrun_pid" 2>/dev/null; do wait "$torchrun_pid"; rc=$?; done
if [ "$rc" -ne 0 ]; then
  run_dir=$("$PYTHON" -c 'import sys
from prism_megatron.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).logging.run_dir)' "$config" "$@" 2>/dev/null)
  if [ -n "$run_dir" ] && [ -f "$run_dir/preempted.json" ]; then
    rc=75
  fi
fi
exit "$rc"
