"""Process-group setup for every way a run is started: plain ``python`` (world 1), ``torchrun``, ``deepspeed``
(both export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) and ``srun`` one task per GPU (SLURM_* only).

A process group always exists, also at world 1, so that the rest of the launcher (DCP, FSDP2, DeepSpeed, the
per-step all-reduce) has one code path. World 1 uses an in-process store: no MASTER_ADDR, no port.
"""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr() -> str:
    """First host of the job's node list (what torchrun's c10d rendezvous would also pick)."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot expand it with scontrol ({e}); "
                           "set MASTER_ADDR explicitly") from e


def _env_from_slurm() -> None:
    """srun without torchrun: translate SLURM_* into the env:// variables (only where they are not set)."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
    # A port per job, so two jobs sharing a node do not collide.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _env_from_slurm()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
    # DeepSpeed reads these even when the process group already exists.
    for key, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(key, str(value))
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from one base seed and a path (rank, worker, purpose): independent streams, reproducible."""
    blob = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    """Per-rank streams (dropout differs across ranks, as with independent GPUs) derived from the one run seed."""
    s = derive_seed(seed, "rank", rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's torch RNG states as tensors (checkpointable with safetensors)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
