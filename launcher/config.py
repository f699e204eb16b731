"""``TrainConfig``: the whole pretraining run as one typed tree, loaded from YAML plus ``a.b=value`` overrides.

``model:`` may name a preset (``model: {preset: tiny, dropout: 0.0}``): the preset's fields are the base and the
other keys override them. The resolved tree (no preset key, every field explicit) is what checkpoints store.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from crossdna import config as cfgio
from crossdna.data import DataConfig
from crossdna.model import CrossDNAConfig
from crossdna.objectives import ObjectiveConfig
from launcher.distributed import DistEnv
from launcher.optim import OptimConfig, ScheduleConfig
from launcher.parallelize import STRATEGIES
from launcher.tracking import TrackingConfig


@dataclass
class TrainerConfig:
    steps: int = 1000                   # optimizer steps of the whole run (resume continues to this number)
    micro_batch: int = 32               # samples per rank per forward
    grad_accum: int = 1                 # micro-batches per optimizer step
    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = "ddp"
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast, fp32 master weights, fp32 EMA
    deepspeed_config: str | None = None  # JSON merged over the generated ZeRO config (launcher/deepspeed_config.py)
    seed: int = 2222                    # one seed; per-rank streams derive from it (launcher/distributed.py)
    deterministic: bool = False         # torch.use_deterministic_algorithms (tests, debugging)
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 500               # 0: no periodic evaluation
    eval_batches: int = 0               # per rank per evaluation; 0: the whole validation split
    eval_micro_batch: int = 0           # 0: same as micro_batch
    ckpt_every: int = 500               # 0: only at the end and on preemption
    keep_last: int = 3
    async_checkpoint: bool = False      # DCP async_save (DDP/FSDP); DeepSpeed always saves synchronously
    resume: bool = True                 # continue from <run_dir>/checkpoints/latest when it exists
    init_weights: str | None = None     # start a new run from a safetensors state dict (export-weights,
                                        # import-upstream); ignored when resuming from a checkpoint
    compile: bool = False               # torch.compile each layer, fla kernels left opaque (crossdna/model/compile.py;
                                        # the 2x of docs/performance.md); ddp and fsdp
    compile_activation_budget: float = 1.0  # < 1: compiled layers recompute cheap ops instead of saving them
                                        # (memory for time; crossdna/model/compile.py)
    overlap_teacher: bool = False       # on a GPU, the teacher's passes on a second CUDA stream beside the student's
                                        # forward (SSScanDNAHybridModel.overlap_teacher); ignored on the CPU
    # Capture each micro-batch's forward + backward as a CUDA graph and replay it (crossdna/cuda_graphs.py): no
    # per-kernel host work, which bounds a step on one GPU at small batches (docs/performance.md). auto: on a
    # single CUDA process with strategy ddp; on: also across ranks (gradients averaged by one flat all-reduce
    # after the backward instead of DDP's overlapped buckets: launcher/parallelize.py); off: eager steps.
    cuda_graph: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: {self.strategy!r} is not one of {list(STRATEGIES)}")
        for name in ("steps", "micro_batch", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "eval_micro_batch", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.compile_activation_budget <= 1.0:
            raise ValueError(f"compile_activation_budget: must be in [0, 1], got {self.compile_activation_budget}")
        if self.compile and self.strategy not in ("ddp", "fsdp"):
            # DeepSpeed's ZeRO hooks gather and release parameters around each module's forward; compiled modules
            # under those hooks are not what the benchmark measured, so they are not offered.
            raise ValueError(f"compile: supported with strategy ddp or fsdp, not {self.strategy}")
        if self.cuda_graph == "on" and self.strategy != "ddp":
            # FSDP2 and ZeRO gather and free parameters around each module on the host's schedule.
            raise ValueError(f"cuda_graph: 'on' is supported with strategy ddp, not {self.strategy}")


@dataclass
class FaultConfig:
    """Deliberate failures, for testing the recovery paths end to end (never set in a real run)."""

    nonfinite_step: int = -1            # make one loss term non-finite at this step (1-based) ...
    nonfinite_term: Literal["total", "ce", "sem", "gate"] = "ce"
    nonfinite_rank: int = 0             # ... on this rank
    kill_after_step: int = -1           # SIGKILL rank 0 right after this step (and its own checkpoint, if it
                                        # writes one) completes; an earlier async save still in flight is not waited for


@dataclass
class TrainConfig:
    model: CrossDNAConfig = field(default_factory=CrossDNAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self):
        if not self.data.path:
            raise ValueError("data.path: the shard manifest (or its directory) is required")
        if self.trainer.cuda_graph == "on":
            if self.model.compat.forward_counts_steps:
                raise ValueError("trainer.cuda_graph: 'on' needs model.compat.gate_step=optimizer and "
                                 "model.compat.ema_update_in_forward=false (upstream's counters change the "
                                 "forward's work from step to step on the host)")
            if self.fault.nonfinite_step >= 0:
                raise ValueError("trainer.cuda_graph: 'on' cannot inject fault.nonfinite_step (a captured step "
                                 "repeats its first step's work)")


def uses_cuda_graph(cfg: TrainConfig, env: DistEnv) -> bool:
    """Whether the trainer captures its micro-step (``trainer.cuda_graph``, above)."""
    mode = cfg.trainer.cuda_graph
    if mode == "on":
        if env.device.type != "cuda":
            raise ValueError(f"trainer.cuda_graph: 'on' needs a CUDA device, this rank runs on {env.device}")
        return True
    return (mode == "auto" and env.device.type == "cuda" and env.world_size == 1
            and cfg.trainer.strategy == "ddp" and not cfg.model.compat.forward_counts_steps
            and cfg.fault.nonfinite_step < 0)


def _expand_model_preset(data: dict[str, Any], where: str) -> dict[str, Any]:
    model = data.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return data
    model = dict(model)
    try:
        base = cfgio.to_dict(CrossDNAConfig.preset(model.pop("preset")))
    except ValueError as e:
        raise cfgio.ConfigError(f"{where}model.preset: {e}") from e
    out = copy.deepcopy(data)
    out["model"] = _merge(base, model)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML + overrides -> TrainConfig; every error names the file and the dotted field."""
    data = cfgio.read_yaml(path) if path is not None else {}
    data = cfgio.apply_overrides(data, overrides)
    where = f"{path}: " if path is not None else ""
    data = _expand_model_preset(data, where)
    try:
        return cfgio.from_dict(TrainConfig, data)
    except cfgio.ConfigError as e:
        raise cfgio.ConfigError(f"{where}{e}") from e
