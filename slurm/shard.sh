#!/usr/bin/env bash
# Shard a genome on Slurm: an array job extracts the windows of PARTS groups of chromosome chunks in
# parallel, then one merge job (afterok) permutes all of them globally and writes the shards + manifest.
#
#   slurm/shard.sh CONFIG OUT [PARTS] [KEY=VALUE ...]     submit both jobs (run on a login node)
#
# Environment: CROSSDNA (command, default "crossdna"; e.g. "python -m crossdna.cli"), SHARD_CPUS (cores per
# task, default 16), SHARD_MEM (default 64G), SHARD_TIME (default 04:00:00), SHARD_PARTITION, SHARD_ACCOUNT
# (optional), SHARD_LOGS (log directory, default OUT-logs beside OUT). OUT must be on a file system every
# node sees.
# A failed or preempted array task is simply resubmitted: finished tasks are skipped (docs/sharding.md).
#
# Internal stages (what the submitted jobs run): `shard.sh extract CONFIG OUT PARTS [KEY=VALUE ...]` and
# `shard.sh merge OUT`.
#SBATCH --job-name=crossdna-shard
#SBATCH --nodes=1
#SBATCH --ntasks=1
set -euo pipefail

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

read -r -a crossdna <<< "${CROSSDNA:-crossdna}"
cpus="${SLURM_CPUS_PER_TASK:-${SHARD_CPUS:-16}}"

submit() {
    [[ $# -ge 2 ]] || usage
    local config=$1 out=$2 parts=8
    shift 2
    # PARTS is optional: a third argument that looks like KEY=VALUE is the first override.
    if [[ $# -gt 0 && "$1" != *=* ]]; then
        parts=$1
        shift
    fi
    [[ -r "$config" ]] || { echo "shard.sh: error: cannot read config $config" >&2; exit 2; }
    [[ "$parts" =~ ^[1-9][0-9]*$ ]] || { echo "shard.sh: error: PARTS must be a positive integer, got $parts" >&2; exit 2; }
    local script logs
    script=$(readlink -f "${BASH_SOURCE[0]}")
    logs="${SHARD_LOGS:-${out%/}-logs}"  # not inside OUT: OUT holds only what the sharder writes
    mkdir -p "$out" "$logs"
    local common=(--cpus-per-task="${SHARD_CPUS:-16}" --mem="${SHARD_MEM:-64G}" --time="${SHARD_TIME:-04:00:00}"
                  --chdir="$PWD" --export=ALL)
    [[ -n "${SHARD_PARTITION:-}" ]] && common+=(--partition="$SHARD_PARTITION")
    [[ -n "${SHARD_ACCOUNT:-}" ]] && common+=(--account="$SHARD_ACCOUNT")
    local array_job merge_job
    array_job=$(sbatch --parsable "${common[@]}" --array="0-$((parts - 1))" \
        --output="$logs/%x-extract-%A_%a.out" "$script" extract "$config" "$out" "$parts" "$@")
    array_job=${array_job%%;*}  # --parsable prints "jobid[;cluster]"
    merge_job=$(sbatch --parsable "${common[@]}" --dependency="afterok:$array_job" --kill-on-invalid-dep=yes \
        --output="$logs/%x-merge-%j.out" "$script" merge "$out")
    echo "extract: array job $array_job ($parts parts); merge: job ${merge_job%%;*} (after all parts succeed)"
}

case "${1:-}" in
    extract)
        [[ $# -ge 4 ]] || usage
        config=$2 out=$3 parts=$4
        shift 4
        exec "${crossdna[@]}" shard extract --config "$config" --out "$out" --part "${SLURM_ARRAY_TASK_ID:?not an array task}" \
            --num-parts "$parts" --workers "$cpus" "$@"
        ;;
    merge)
        [[ $# -eq 2 ]] || usage
        exec "${crossdna[@]}" shard merge "$2" --workers "$cpus"
        ;;
    -h|--help|"")
        usage
        ;;
    *)
        submit "$@"
        ;;
esac
