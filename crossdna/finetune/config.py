"""Finetuning settings: a task list with per-task presets, shared training settings, seeds and tracking.

One file describes a benchmark suite (``configs/finetune/gue_tf.yaml``); ``crossdna finetune`` runs one of its tasks
with one seed, ``crossdna benchmark`` runs all of them with every seed. Relative task paths resolve against
``data_root`` (itself relative to the working directory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from crossdna import config as _config
from crossdna.finetune.metrics import METRICS
from crossdna.finetune.readers import Format, LetterPolicy, TaskKind


@dataclass
class TaskConfig:
    """One downstream task and its preset (max length, batch, lr, epochs)."""

    name: str
    train: str
    test: str
    # Model selection split. None carves ``val_fraction`` of train (stratified for classes, with ``split_seed``,
    # the same for every training seed). Never the test split (upstream selects on test: spec §6 defect 15).
    val: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    format: Format = "auto"
    kind: TaskKind = "multiclass"
    sequence_column: str = "sequence"
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    where: dict[str, str] = field(default_factory=dict)  # csv only: keep rows whose columns equal these values
    letters: LetterPolicy = "error"
    num_labels: int | None = None  # multiclass: None infers max(train label) + 1
    metric: str = "mcc"            # selected on the validation split
    max_length: int = 512
    batch_size: int = 32
    lr: float = 1e-4
    epochs: int = 10
    max_train_samples: int | None = None  # stratified subsample of train (quick runs); None uses all

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: {self.name!r} must be non-empty without '/' (it names result rows and runs)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.metric not in METRICS[self.kind]:
            raise ValueError(f"metric: {self.metric!r} is not a {self.kind} metric; "
                             f"choose from {list(METRICS[self.kind])}")
        if self.kind == "multiclass" and len(self.label_columns) != 1:
            raise ValueError(f"label_columns: a multiclass task has one label column, got {self.label_columns}")
        for name in ("max_length", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.num_labels is not None and self.num_labels < 2 and self.kind == "multiclass":
            raise ValueError(f"num_labels: a multiclass task needs >= 2 classes, got {self.num_labels}")
        if self.max_train_samples is not None and self.max_train_samples < 2:
            raise ValueError(f"max_train_samples: must be >= 2, got {self.max_train_samples}")


@dataclass
class TrainConfig:
    """Settings shared by every task of a suite."""

    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.01   # linear warm-up over this share of the steps, then cosine to min_lr_ratio·lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    freeze_backbone: bool = False   # linear probe: only the head trains
    head_dropout: float = 0.0
    # Pads are N (id 4) as upstream; the pooled mean excludes them. "max_length" pads every batch to the task's
    # max_length so a sequence's representation does not depend on its batch neighbours; "longest" pads to the
    # longest sequence in the batch (faster for variable-length tasks, batch-dependent, like any padded model).
    padding_side: Literal["right", "left"] = "right"
    pad_to: Literal["max_length", "longest"] = "max_length"
    truncation: Literal["right", "left", "center"] = "right"  # which end survives: keep the start, end or middle
    evals_per_epoch: int = 1
    eval_batch_size: int = 256
    max_steps: int | None = None    # stop early (smoke tests); the LR schedule is laid out over min(total, max_steps)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"            # auto: cuda if available
    # auto: on CUDA with pad_to max_length, the training step is captured once as a CUDA graph and replayed (a
    # ~100-bp step is ~10k kernel launches: launch-bound without it). off: every step eager.
    cuda_graph: Literal["auto", "off"] = "auto"
    # Backbone config overrides for finetuning, dotted as on the command line (spec §4.4: no EMA teacher,
    # dropout 0.10, bridge dropout 0.05). gate_freeze_steps=0: upstream finetuning inherits the pretraining g_step,
    # so its fusion gate is live from the first batch; 0 does the same without depending on a step counter.
    model_overrides: list[str] = field(
        default_factory=lambda: ["use_ema_teacher=false", "dropout=0.1", "bridge_dropout=0.05", "gate_freeze_steps=0"])

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout: must be in [0, 1), got {self.head_dropout}")
        for name in ("evals_per_epoch", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class BenchmarkConfig:
    """A suite: tasks, shared training settings, seeds, and where runs are tracked."""

    name: str
    tasks: list[TaskConfig]
    data_root: str = "."
    model_preset: str = "8m"        # architecture for --init scratch (checkpoints carry their own config)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: str = "crossdna-finetune"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under the output directory

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: the suite lists no tasks")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tasks: duplicate task names {dupes}")
        if not self.seeds:
            raise ValueError("seeds: need at least one seed")

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"tasks: no task {name!r}; the suite has {[t.name for t in self.tasks]}")

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.data_root) / p

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "BenchmarkConfig":
        return _config.load(cls, path, overrides)
