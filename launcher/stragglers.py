"""Cross-rank step-time spread: the cheapest signal that one rank (a slow GPU, a busy node) holds everyone back.

Every rank contributes its own mean step time over the last log interval; one all-reduce of a 2-element tensor
with MIN over ``(t, -t)`` yields both the fastest and the slowest rank's time (gloo and NCCL both support MIN).
The result stays a tensor on the collective's device, so handing it to ``Tracker.log_metrics`` costs no host sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _collective_device() -> torch.device:
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def step_time_spread(step_time_s: float, prefix: str = "perf/step_time") -> dict[str, torch.Tensor]:
    """Collective: ``{prefix}_min_s``, ``{prefix}_max_s`` and ``{prefix}_straggler`` (max/min, 1.0 = balanced).

    Call on every rank at the same step (e.g. every log interval). Without torch.distributed it describes the
    single process.
    """
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([step_time_s, -step_time_s], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    else:
        t = torch.tensor([step_time_s, -step_time_s], dtype=torch.float64)
    fastest, slowest = t[0], -t[1]
    return {
        f"{prefix}_min_s": fastest,
        f"{prefix}_max_s": slowest,
        f"{prefix}_straggler": slowest / fastest.clamp_min(1e-12),
    }
