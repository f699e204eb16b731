#!/usr/bin/env bash
# Pretrain across a Slurm allocation: one srun task per node starts torchrun (slurm/torchrun_node.sh), whose
# c10d rendezvous lives on the allocation's first node; one rank per allocated GPU.
#
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 --time=24:00:00 \
#       slurm/pretrain.sh configs/pretrain/8m.yaml trainer.steps=20000 trainer.run_dir=runs/8m
#
# Submit from the repository (or set CROSSDNA_HOME) with the Python environment active (or CROSSDNA_PYTHON set).
# Preemption: Slurm sends USR1 to this script 180 s before the time limit; the ranks checkpoint, the job is
# requeued and resumes from that checkpoint (trainer.resume). Environment knobs and logs: docs/slurm.md.
#SBATCH --job-name=crossdna-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
set -euo pipefail
CROSSDNA_SCRIPT=pretrain.sh
# Slurm runs a copy of this file from its spool directory, so the repository is found by name, not next to $0.
if ! cd "${CROSSDNA_HOME:-${SLURM_SUBMIT_DIR:-.}}" || [ ! -f slurm/common.sh ]; then
  echo "$CROSSDNA_SCRIPT: error: submit it from the crossdna repository, or set CROSSDNA_HOME" >&2
  exit 2
fi
# shellcheck source=slurm/common.sh
source slurm/common.sh

[ $# -ge 1 ] || crossdna_die "usage: sbatch [options] slurm/pretrain.sh CONFIG.yaml [key=value ...]"
config=$1
shift
[ -f "$config" ] || crossdna_die "config '$config' not found (relative to $PWD)"
crossdna_require_job
crossdna_export_env

CROSSDNA_NPROC=$(crossdna_procs_per_node)
CROSSDNA_RDZV_ENDPOINT=$(crossdna_head_node):$(crossdna_port)
CROSSDNA_NODE_LOG_ROOT=$(crossdna_log_dir)
export CROSSDNA_NPROC CROSSDNA_RDZV_ENDPOINT CROSSDNA_NODE_LOG_ROOT
crossdna_log "job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x $CROSSDNA_NPROC rank(s)," \
  "rendezvous $CROSSDNA_RDZV_ENDPOINT, per-rank logs in $CROSSDNA_NODE_LOG_ROOT"

crossdna_run_step srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label \
  bash slurm/torchrun_node.sh -m launcher.train --config "$config" "$@"
