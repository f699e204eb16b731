#!/usr/bin/env bash
# Pretrain with DeepSpeed ZeRO across a Slurm allocation. srun is the launcher: one task per rank (one per
# allocated GPU), and launcher/distributed.py turns SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS into the env://
# variables DeepSpeed reads (RANK, LOCAL_RANK, WORLD_SIZE); MASTER_ADDR/MASTER_PORT name the first node.
# DeepSpeed's own multi-node launcher needs pdsh/ssh between nodes, which Slurm clusters rarely allow.
#
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=8 --time=24:00:00 \
#       slurm/pretrain_deepspeed.sh configs/pretrain/8m.yaml trainer.steps=20000 trainer.run_dir=runs/8m-zero2
#
# ZeRO stage 2 unless an override says otherwise (trainer.strategy=zero1|zero3); trainer.deepspeed_config=X.json
# tunes the rest of the generated DeepSpeed config. Preemption and logs as for slurm/pretrain.sh (docs/slurm.md).
#SBATCH --job-name=crossdna-zero
#SBATCH --nodes=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
set -euo pipefail
CROSSDNA_SCRIPT=pretrain_deepspeed.sh
# Slurm runs a copy of this file from its spool directory, so the repository is found by name, not next to $0.
if ! cd "${CROSSDNA_HOME:-${SLURM_SUBMIT_DIR:-.}}" || [ ! -f slurm/common.sh ]; then
  echo "$CROSSDNA_SCRIPT: error: submit it from the crossdna repository, or set CROSSDNA_HOME" >&2
  exit 2
fi
# shellcheck source=slurm/common.sh
source slurm/common.sh

[ $# -ge 1 ] || crossdna_die "usage: sbatch [options] slurm/pretrain_deepspeed.sh CONFIG.yaml [key=value ...]"
config=$1
shift
[ -f "$config" ] || crossdna_die "config '$config' not found (relative to $PWD)"
for override in "$@"; do
  case $override in
    trainer.strategy=zero[123]) ;;
    trainer.strategy=*) crossdna_die "'$override': this script runs DeepSpeed ZeRO (zero1, zero2 or zero3); use slurm/pretrain.sh for ddp/fsdp" ;;
  esac
done
crossdna_require_job
crossdna_export_env

nproc=$(crossdna_procs_per_node)
# The node's CPUs are shared out between its ranks, whether they were asked for as --cpus-per-task or as
# --ntasks-per-node (srun refuses a step with more CPUs than the allocation has).
cpus_per_rank=$((${SLURM_CPUS_ON_NODE:-$nproc} / nproc))
[ "$cpus_per_rank" -ge 1 ] || crossdna_die "$nproc ranks per node but only $SLURM_CPUS_ON_NODE CPU(s) allocated per node:" \
  "ask for at least --cpus-per-task=$nproc"
MASTER_ADDR=$(crossdna_head_node)
MASTER_PORT=$(crossdna_port)
export MASTER_ADDR MASTER_PORT
log_dir=$(crossdna_log_dir)
crossdna_log "job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x $nproc rank(s)," \
  "master $MASTER_ADDR:$MASTER_PORT, per-rank logs in $log_dir"

# Per-rank logs: %n is the node's index in the job, %t the global rank (%N would be the hostname, which
# emulated and multi-slurmd nodes share). The zero2 default comes first so that a later override wins.
crossdna_run_step srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node="$nproc" --cpus-per-task="$cpus_per_rank" \
  --kill-on-bad-exit=1 \
  --output="$log_dir/node%n-rank%t.log" --open-mode=append \
  "$CROSSDNA_PYTHON" -m launcher.train --config "$config" trainer.strategy=zero2 "$@"
