"""Provenance tags for an MLflow run: code version, software stack, hardware and scheduler context.

Everything a reader needs to tell two runs apart or to reproduce one: git sha + dirty flag, library versions,
GPU model, world size, node list and Slurm job/array ids. Values only, never the environment itself: credentials
live in environment variables and must not reach the tracking store.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from crossdna.versions import installed_version

REPO_DIR = Path(__file__).resolve().parents[1]

# tag -> distribution whose installed version it records
_VERSIONS = {
    "version.torch": "torch",
    "version.triton": "triton",
    "version.fla": "fla-core",
    "version.deepspeed": "deepspeed",
    "version.mlflow": "mlflow",
}

# tag -> Slurm variable; only the ids that locate the job, not the rest of the (possibly sensitive) environment
_SLURM = {
    "slurm.job_id": "SLURM_JOB_ID",
    "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm.restart_count": "SLURM_RESTART_COUNT",
    "slurm.partition": "SLURM_JOB_PARTITION",
}


def git_state(repo: Path = REPO_DIR) -> tuple[str, str]:
    """(sha, dirty) of the code being run: ("unknown", "unknown") outside a git checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        # Tracked changes only: untracked run outputs in the checkout do not change the code that ran.
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


def gpu_model() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none"
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return ", ".join(names)


def gather_hostnames() -> list[str]:
    """Hostnames of all ranks (a collective when torch.distributed is initialised: every rank must call it)."""
    import torch.distributed as dist

    host = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [host]
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return [h or "?" for h in hosts]


def environment_tags(world_size: int, hostnames: list[str]) -> dict[str, str]:
    import torch

    from crossdna import __version__

    sha, dirty = git_state()
    nodes = sorted(set(hostnames))
    tags = {
        "git.sha": sha,
        "git.dirty": dirty,
        "world_size": str(world_size),
        "num_nodes": str(len(nodes)),
        # Slurm's compressed list (gpu[01-04]) when present: exact and short even for hundreds of nodes.
        "nodes": os.environ.get("SLURM_JOB_NODELIST") or ",".join(nodes),
        "gpu.model": gpu_model(),
        "version.cuda": torch.version.cuda or "none",
        "version.crossdna": __version__,
        **{tag: installed_version(dist) or "not installed" for tag, dist in _VERSIONS.items()},
    }
    tags.update({tag: os.environ[var] for tag, var in _SLURM.items() if os.environ.get(var)})
    return tags
