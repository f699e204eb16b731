#!/usr/bin/env bash
# Finetune a benchmark suite on Slurm: one array task per task of the suite, each running every seed of it
# (`crossdna benchmark --tasks NAME`) into OUT/NAME/ (results.json, results.md, MLflow runs).
#
#   slurm/finetune.sh [--SBATCH-OPTION=VALUE ...] SUITE.yaml INIT OUT [KEY=VALUE ...]
#       on a login node: submits the array itself, with the sbatch options given first (in --name=value form)
#
#   e.g. slurm/finetune.sh --gpus-per-task=1 --time=12:00:00 --partition=gpu configs/finetune/genomic_benchmarks.yaml \
#            runs/8m/checkpoints/latest results/gb-8m data_root=/data/genomic_benchmarks
#
# INIT: 'scratch', an exported model or a pretraining checkpoint (crossdna benchmark --help). Resources not given
# as options come from the #SBATCH lines below; CROSSDNA_PYTHON names the interpreter (default python3).
#SBATCH --job-name=crossdna-finetune
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail
CROSSDNA_SCRIPT=finetune.sh
if ! cd "${CROSSDNA_HOME:-${SLURM_SUBMIT_DIR:-.}}" || [ ! -f slurm/common.sh ]; then
  echo "$CROSSDNA_SCRIPT: error: run it from the crossdna repository, or set CROSSDNA_HOME" >&2
  exit 2
fi
# shellcheck source=slurm/common.sh
source slurm/common.sh

sbatch_options=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do
  sbatch_options+=("$1")
  shift
done
[ $# -ge 3 ] || crossdna_die "usage: slurm/finetune.sh [--SBATCH-OPTION=VALUE ...] SUITE.yaml INIT OUT [KEY=VALUE ...]"
config=$1 init=$2 out=$3
shift 3
[ -f "$config" ] || crossdna_die "suite config '$config' not found (relative to $PWD)"
crossdna_export_env

# The suite's task names in order, read by the same loader the benchmark uses (overrides included).
mapfile -t tasks < <("$CROSSDNA_PYTHON" -c '
import sys
from crossdna.finetune.config import BenchmarkConfig
print("\n".join(t.name for t in BenchmarkConfig.load(sys.argv[1], sys.argv[2:]).tasks))' "$config" "$@")
[ "${#tasks[@]}" -gt 0 ] || crossdna_die "'$config': cannot list its tasks (see the error above)"

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  [ -z "${SLURM_JOB_ID:-}" ] || crossdna_die "run it on a login node: it submits its own array job"
  mkdir -p "$out"
  job=$(sbatch --parsable --array="0-$((${#tasks[@]} - 1))" --chdir="$PWD" "${sbatch_options[@]}" \
    "$(readlink -f "${BASH_SOURCE[0]}")" "$config" "$init" "$out" "$@")
  echo "array job ${job%%;*}: ${#tasks[@]} tasks of $config -> $out/<task>/"
  exit 0
fi

# Array task: the suite must still have the tasks it had at submission, or the indices would shift.
[ "${#tasks[@]}" -eq "${SLURM_ARRAY_TASK_COUNT:-${#tasks[@]}}" ] \
  || crossdna_die "'$config' now has ${#tasks[@]} tasks, the array was submitted for $SLURM_ARRAY_TASK_COUNT"
task=${tasks[$SLURM_ARRAY_TASK_ID]}
crossdna_log "array task $SLURM_ARRAY_TASK_ID: $task, restart ${SLURM_RESTART_COUNT:-0}"
exec "$CROSSDNA_PYTHON" -m crossdna.cli benchmark --config "$config" --tasks "$task" --init "$init" \
  --out "$out/$task" --quiet "$@"
