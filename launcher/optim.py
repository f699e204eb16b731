"""AdamW with no-decay groups, and the learning-rate schedules (ours and the upstream one, reproduced).

A schedule is a pure function ``step -> lr`` of the optimizer-step count, so its whole checkpoint state is the
step itself and a resumed run (on any world size) continues the same curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

# Parameter-name suffixes that never take weight decay besides biases and norm weights: the Comba decay/skip
# parameters are per-head scalars whose magnitude *is* the learned timescale, shrinking them towards 0 changes
# the recurrence rather than regularising it.
NO_DECAY_SUFFIXES = ("A_log", "D", "dt_bias")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    no_decay_groups: bool = True  # false = upstream (decay on everything, spec §5)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """``cosine``: linear warm-up from ``warmup_init_lr`` to ``optim.lr`` over ``warmup_steps``, then a cosine to
    ``min_lr`` at the last step. ``upstream``: timm's ``CosineLRScheduler`` exactly as the upstream run drove it
    (``t_in_epochs=True`` but stepped once per optimizer step, spec §5): a linear warm-up over ``upstream_warmup_t``
    steps, a cosine over the first ``upstream_t_initial`` steps that the warm-up hides, then ``min_lr`` for the
    rest of training."""

    kind: Literal["cosine", "upstream"] = "cosine"
    warmup_steps: int = 100
    warmup_init_lr: float = 1e-6
    min_lr: float = 1e-5
    # upstream: t_initial = max_epochs = 60, warmup_t = ceil(976563 / 150) * 60 * 0.01 = 3906.6 (spec §5)
    upstream_t_initial: int = 60
    upstream_warmup_t: float = 3906.6

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.min_lr < 0 or self.warmup_init_lr < 0:
            raise ValueError("min_lr/warmup_init_lr: must be >= 0")
        if self.upstream_t_initial <= 0 or self.upstream_warmup_t < 0:
            raise ValueError("upstream_t_initial must be > 0 and upstream_warmup_t >= 0")


def cosine_lr(step: int, *, peak: float, total_steps: int, warmup_steps: int, warmup_init: float,
              floor: float) -> float:
    if step < warmup_steps:
        return warmup_init + (peak - warmup_init) * step / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def upstream_timm_lr(t: int, *, base_lr: float, t_initial: int, warmup_t: float, warmup_lr_init: float,
                     lr_min: float) -> float:
    """timm 1.0 ``CosineLRScheduler._get_lr(t)`` with cycle_mul=1, cycle_decay=1, cycle_limit=1, k_decay=1 and
    warmup_prefix=False, where ``t`` is the number of optimizer steps already taken."""
    if t < warmup_t:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t
    cycle = t // t_initial
    if cycle >= 1:  # cycle_limit = 1: past the first cycle timm returns lr_min forever
        return lr_min
    t_curr = t - t_initial * cycle
    return lr_min + 0.5 * (base_lr - lr_min) * (1.0 + math.cos(math.pi * t_curr / t_initial))


class LRSchedule:
    """``schedule(step)`` = learning rate for the optimizer step that follows ``step`` completed steps."""

    def __init__(self, cfg: ScheduleConfig, peak_lr: float, total_steps: int):
        self.cfg, self.peak_lr, self.total_steps = cfg, peak_lr, total_steps

    def __call__(self, step: int) -> float:
        c = self.cfg
        if c.kind == "upstream":
            return upstream_timm_lr(step, base_lr=self.peak_lr, t_initial=c.upstream_t_initial,
                                    warmup_t=c.upstream_warmup_t, warmup_lr_init=c.warmup_init_lr, lr_min=c.min_lr)
        return cosine_lr(step, peak=self.peak_lr, total_steps=self.total_steps, warmup_steps=c.warmup_steps,
                         warmup_init=c.warmup_init_lr, floor=c.min_lr)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (every 1-D tensor) and the Comba timescale parameters."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_SUFFIXES


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups over trainable parameters only (the EMA teacher is never handed to the optimizer,
    spec §6 defect 30). Each group records its parameter names so that logs and tests can check the split."""
    decay, no_decay = {"params": [], "param_names": []}, {"params": [], "param_names": []}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        group = no_decay if (cfg.no_decay_groups and is_no_decay(name, p)) else decay
        group["params"].append(p)
        group["param_names"].append(name)
    decay["weight_decay"], no_decay["weight_decay"] = cfg.weight_decay, 0.0
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig,
                    fused_on: torch.device | None = None, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW, foreach; fused on ``fused_on`` (a CUDA device, plain tensors: one kernel per step instead of a
    dozen foreach launches per group). ``capturable`` (fused only): step counters and learning rate are device
    tensors, so that the step can be replayed from a CUDA graph (``set_lr`` fills the lr in place)."""
    groups = param_groups(named_params, cfg)
    if fused_on is not None:
        lr = torch.tensor(cfg.lr, device=fused_on) if capturable else cfg.lr
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=True, capturable=capturable)
    # foreach: fused AdamW has no CPU/gloo DTensor path (FSDP2 on CPU) and DeepSpeed wraps the groups itself.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """In place where the lr is a device tensor (a CUDA-graph-captured optimizer step reads it from there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
