#!/bin/bash
# One node's share of a dpo_dist Slurm job (started by dpo.sbatch through srun, once per node):
# runs `accelerate launch` for this node's GPUs with the node's rank in the job, and passes
# SIGUSR1/SIGTERM on to the training ranks so they can checkpoint before stopping.
set -uo pipefail
CONFIG=$1
shift
NODES=${SLURM_NTASKS:-1}
NODE_RANK=${SLURM_PROCID:-0}
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/accelerate/zero3.yaml}
echo "[node $NODE_RANK/$NODES on $(hostname)] accelerate launch: $GPUS_PER_NODE process(es) here, $ACCELERATE_CONFIG"

accelerate launch \
    --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NODES" \
    --machine_rank "$NODE_RANK" \
    --num_processes $((NODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_HOST" \
    --main_process_port "$MASTER_PORT" \
    --deepspeed_multinode_launcher standard \
    --same_network \
    -m dpo_dist train --config "$CONFIG" "$@" &
LAUNCHER=$!

forwarded=0
forward() {
    forwarded=1
    echo "[node $NODE_RANK] forwarding $1 to the training ranks"
    pkill "-$1" -P "$LAUNCHER"  # the ranks are the launcher's children
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

status=0
while true; do
    wait "$LAUNCHER"
    status=$?
    kill -0 "$LAUNCHER" 2>/dev/null || break
done
# The ranks exit 85 after a preemption checkpoint; the launcher reports that as a failure.
if [ "$forwarded" = 1 ] && [ "$status" != 0 ]; then
    status=85
fi
exit "$status"
