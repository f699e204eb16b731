# shellcheck shell=bash
# Shared by the slurm/*.sh job scripts, which source it after they cd to the repository: functions, one constant,
# and the environment every node inherits through srun (Slurm exports the batch environment to the tasks).

# One line naming the job script, then exit 2 (the status the crossdna CLI also uses for bad input).
crossdna_die() {
  printf '%s: error: %s\n' "${CROSSDNA_SCRIPT:-slurm}" "$*" >&2
  exit 2
}

crossdna_log() {
  printf '[%s %s] %s\n' "${CROSSDNA_SCRIPT:-slurm}" "$(date -u +%H:%M:%S)" "$*" >&2
}

crossdna_require_job() {
  [ -n "${SLURM_JOB_ID:-}" ] || crossdna_die "not inside a Slurm job: submit it with sbatch"
}

# A positive integer or die naming what it is.
crossdna_require_count() {
  local name=$1 value=$2
  case $value in
    '' | *[!0-9]* | 0*) crossdna_die "$name must be a positive integer, got '$value'" ;;
  esac
}

# The first node of the allocation hosts the rendezvous. Names come from Slurm's node list, never from
# `hostname`: emulated or multi-slurmd nodes share one hostname.
crossdna_head_node() {
  local nodes
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  [ "${#nodes[@]}" -gt 0 ] || crossdna_die "scontrol cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
  printf '%s\n' "${nodes[0]}"
}

# One port per job (the same formula as launcher/distributed.py), so two jobs that share a node do not collide,
# and a requeued job, which keeps its id, reuses its port.
crossdna_port() {
  printf '%s\n' "$((20000 + SLURM_JOB_ID % 20000))"
}

# Ranks per node: $CROSSDNA_PROCS_PER_NODE, else the GPUs Slurm allocated on this node, else 1 (CPU).
crossdna_procs_per_node() {
  local n
  if [ -n "${CROSSDNA_PROCS_PER_NODE:-}" ]; then
    n=$CROSSDNA_PROCS_PER_NODE
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "$SLURM_GPUS_ON_NODE" != 0 ]; then
    n=$SLURM_GPUS_ON_NODE
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    n=${#ids[@]}
  else
    n=1
  fi
  crossdna_require_count "ranks per node (CROSSDNA_PROCS_PER_NODE / the GPU allocation)" "$n"
  printf '%s\n' "$n"
}

# Environment shared by every rank of every job script.
crossdna_export_env() {
  # Triton's kernel cache on node-local disk: compiling into a shared filesystem from hundreds of ranks is slow
  # and races (fla#533). The same path on every node names each node's own /tmp.
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/crossdna-$(id -un)/triton}
  export PYTHONUNBUFFERED=1
  # The interpreter every task runs: activate the environment before sbatch, or name it here.
  export CROSSDNA_PYTHON=${CROSSDNA_PYTHON:-python3}
  # srun does not inherit sbatch's --cpus-per-task since Slurm 22.05.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  fi
  # Rank variables inherited from the submitting shell (sbatch exports its environment; e.g. a submission from
  # inside another distributed job) would give every task of this job the same rank: each task's rank comes
  # from torchrun or from SLURM_PROCID instead.
  unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID
}

# Where the per-node and per-rank logs of this job go (created here; Slurm does not create directories).
crossdna_log_dir() {
  local dir=${CROSSDNA_LOG_DIR:-logs/slurm}/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID
  mkdir -p "$dir" || crossdna_die "cannot create the log directory '$dir'"
  printf '%s\n' "$dir"
}

# The trainer's exit status after it checkpointed on a preemption signal (launcher/signals.py).
CROSSDNA_REQUEUE_EXIT=75

# Run one job step (an srun command line) and handle preemption:
#  - `#SBATCH --signal=B:USR1@T` (or `scancel --signal=USR1 --batch`) reaches this batch shell only; it is passed
#    on to the step, whose ranks agree on a step boundary, checkpoint and exit with CROSSDNA_REQUEUE_EXIT;
#  - then the job is requeued and resumes from that checkpoint (--requeue, trainer.resume).
# The step runs in the background because bash runs traps only between foreground commands.
crossdna_run_step() {
  local step_pid="" status=0 warned=0
  trap 'warned=1; crossdna_log "USR1: asking the ranks to checkpoint"; [ -n "$step_pid" ] && kill -USR1 "$step_pid" 2>/dev/null' USR1
  "$@" &
  step_pid=$!
  while :; do
    status=0
    wait "$step_pid" || status=$?
    # A trap interrupts `wait` (status > 128) while the step goes on; the step is gone once kill -0 fails.
    kill -0 "$step_pid" 2>/dev/null || break
  done
  trap - USR1
  # torchrun reports any failed worker as 1, so after a warning any failure counts as a preemption exit.
  if [ "$status" -eq "$CROSSDNA_REQUEUE_EXIT" ] || { [ "$warned" = 1 ] && [ "$status" -ne 0 ]; }; then
    crossdna_log "step exited with $status after a preemption request: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || crossdna_die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
  fi
  [ "$status" -eq 0 ] || crossdna_log "step failed with status $status"
  return "$status"
}
