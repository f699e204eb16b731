#!/usr/bin/env bash
# The task slurm/pretrain.sh starts on each node (srun, one per node): torchrun for this node's ranks, joining
# the job's c10d rendezvous. Arguments: the training command, e.g. `-m launcher.train --config X key=value`.
# Inputs from the batch step: CROSSDNA_PYTHON, CROSSDNA_NPROC, CROSSDNA_RDZV_ENDPOINT, CROSSDNA_NODE_LOG_ROOT.
set -euo pipefail
# torchrun's agent has no USR1 handler, so the signal that asks the ranks to checkpoint would kill it. An ignored
# signal stays ignored through exec and fork, and each rank installs its own handler (launcher/signals.py).
trap '' USR1
# Named by Slurm's node name and index: emulated and multi-slurmd nodes share one hostname.
log_dir=$CROSSDNA_NODE_LOG_ROOT/node$SLURM_NODEID-$SLURMD_NODENAME
exec "$CROSSDNA_PYTHON" -m torch.distributed.run \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$CROSSDNA_NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$CROSSDNA_RDZV_ENDPOINT" --rdzv-id="$SLURM_JOB_ID" \
  --max-restarts=0 --log-dir="$log_dir" --redirects=3 --tee=3 \
  "$@"
