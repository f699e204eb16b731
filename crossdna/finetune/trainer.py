"""Finetune one task with one seed: train, select on validation, report test at the selected step.

Model selection reads the validation split only; the test split is scored once, with the weights of the best
validation evaluation (upstream selects on test: spec §6 defect 15). Metrics cover the whole split at once.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crossdna.cuda_graphs import GraphedStep
from crossdna.finetune.config import TaskConfig, TrainConfig
from crossdna.finetune.data import EncodedSplit, TaskSplits, encode
from crossdna.finetune.heads import SequenceModel
from crossdna.finetune.metrics import LOWER_IS_BETTER, compute_metrics
from launcher.optim import set_lr

LogFn = Callable[[int, dict[str, float]], None]


class NonFiniteLoss(RuntimeError):
    """The training loss went NaN or infinite: a bug or a divergence, which training on would only spread."""


@dataclass
class FinetuneResult:
    task: str
    seed: int
    metric: str
    best_step: int
    steps: int
    val: dict[str, float]
    test: dict[str, float]
    train_samples: int
    val_samples: int
    test_samples: int
    train_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and conv kernels; not biases, norm gains or per-head scalars (ndim < 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def uses_cuda_graph(train_cfg: TrainConfig, device: torch.device, backbone: nn.Module) -> bool:
    """Capture needs fixed shapes and a forward without host-side state (``CompatConfig.forward_counts_steps``)."""
    compat = getattr(getattr(backbone, "cfg", None), "compat", None)
    return (train_cfg.cuda_graph == "auto" and device.type == "cuda" and train_cfg.pad_to == "max_length"
            and not (compat is not None and compat.forward_counts_steps))


def warmup_cosine(total_steps: int, warmup_fraction: float, min_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(round(warmup_fraction * total_steps))) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def pad_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A short (last) batch filled up to ``rows`` with copies of its first row, and ``weight`` [rows]: 1 for real rows,
    0 for the copies. Every step and evaluation then has one shape: no kernel autotuning or compilation for an odd
    batch size mid-run, and a captured step covers every batch."""
    n = next(iter(batch.values())).shape[0]
    weight = (torch.arange(rows) < n).float()
    if n == rows:
        return {**batch, "weight": weight}
    fill = torch.zeros(rows - n, dtype=torch.long)
    return {**{k: torch.cat([v, v[fill]]) for k, v in batch.items()}, "weight": weight}


@torch.no_grad()
def predict(model: SequenceModel, split: EncodedSplit, batch_size: int, pad_to_longest: bool,
            device: torch.device, autocast: torch.autocast | None = None) -> np.ndarray:
    """Head outputs for the whole split, in order, as float32 numpy."""
    model.eval()
    outs = []
    for start in range(0, len(split), batch_size):
        n = min(batch_size, len(split) - start)
        b = split.batch(torch.arange(start, start + n), pad_to_longest)
        if not pad_to_longest:
            b = pad_rows(b, batch_size)
        with autocast or torch.autocast(device.type, enabled=False):
            out = model(b["input_ids"].to(device, non_blocking=True), b["attention_mask"].to(device, non_blocking=True))
        outs.append(out[:n].float().cpu())
    return torch.cat(outs).numpy()


def _better(metric: str, new: float, best: float | None) -> bool:
    if best is None or (math.isnan(best) and not math.isnan(new)):
        return True
    if math.isnan(new):
        return False
    return new < best if metric in LOWER_IS_BETTER else new > best


def finetune(task: TaskConfig, train_cfg: TrainConfig, splits: TaskSplits, backbone: nn.Module, d_model: int,
             seed: int, log: LogFn | None = None, progress: bool = True) -> FinetuneResult:
    """Train ``backbone`` + head on ``splits`` (the caller seeds before building ``backbone``)."""
    device = resolve_device(train_cfg.device)
    seed_everything(seed)
    model = SequenceModel(backbone, d_model, splits.num_outputs, task.kind, train_cfg.head_dropout,
                          train_cfg.freeze_backbone).to(device)
    train = encode(splits.train, task.max_length, train_cfg)
    val = encode(splits.val, task.max_length, train_cfg)
    test = encode(splits.test, task.max_length, train_cfg)
    longest = train_cfg.pad_to == "longest"
    use_bf16 = train_cfg.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    steps_per_epoch = math.ceil(len(train) / task.batch_size)
    total = steps_per_epoch * task.epochs
    if train_cfg.max_steps is not None:
        total = min(total, train_cfg.max_steps)
    eval_every = max(1, steps_per_epoch // train_cfg.evals_per_epoch)
    graphed = uses_cuda_graph(train_cfg, device, backbone)
    # Captured: the step counter and the lr live on the device (capturable), so a replay reads this step's values.
    # Fused on CUDA either way, so that captured and eager runs share the optimizer kernel.
    optimizer = torch.optim.AdamW(_param_groups(model, train_cfg.weight_decay),
                                  lr=torch.tensor(task.lr, device=device) if graphed else task.lr,
                                  betas=train_cfg.betas, fused=device.type == "cuda" or None, capturable=graphed)
    lr_factor = warmup_cosine(total, train_cfg.warmup_fraction, train_cfg.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    set_step = getattr(backbone, "set_step", None)
    # The gate warm-up continues from the backbone's own step, as upstream finetuning inherits the pretraining g_step
    # (spec §4.4): a pretrained gate stays live whatever gate_freeze_steps says; a scratch backbone starts at 0.
    first_step = int(getattr(backbone, "step", 0))

    def train_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast:
            out = model(batch["input_ids"], batch["attention_mask"])
        loss = model.loss(out.float(), batch["labels"], batch.get("weight"))
        loss.backward()
        if train_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step_fn = GraphedStep(train_step) if graphed else None
    gate_frozen = getattr(backbone, "gate_frozen", lambda: False)

    def evaluate(split: EncodedSplit) -> dict[str, float]:
        out = predict(model, split, train_cfg.eval_batch_size, longest, device, autocast)
        metrics = compute_metrics(task.kind, out, split.labels.numpy())
        metrics["loss"] = float(model.loss(torch.from_numpy(out), split.labels))
        return metrics

    best_val, best_metric, best_state, best_step = None, None, None, 0
    loss_sum, loss_count = torch.zeros((), device=device), 0
    started = time.perf_counter()
    bar = tqdm(total=total, desc=f"{task.name} seed {seed}", unit="step", disable=not progress, leave=False)
    step = 0
    while step < total:
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), task.batch_size):
            if step >= total:
                break
            model.train()
            batch = train.batch(order[start:start + task.batch_size], longest)
            if not longest:
                batch = pad_rows(batch, task.batch_size)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            lr = task.lr * lr_factor(step)
            set_lr(optimizer, lr)
            loss = step_fn(batch, phase=gate_frozen()) if step_fn is not None else train_step(batch)
            step += 1
            if set_step is not None:  # the gate warm-up counts optimizer steps (spec §2.8)
                set_step(first_step + step)
            loss_sum += loss.detach()
            loss_count += 1
            bar.update()
            if step % eval_every == 0 or step == total:
                train_loss = float(loss_sum) / loss_count  # one host sync per evaluation, not per step
                if not math.isfinite(train_loss):
                    raise NonFiniteLoss(
                        f"finetuning {task.name} (seed {seed}): the mean training loss over steps "
                        f"{step - loss_count + 1}-{step} is {train_loss} (lr {lr:g}, precision {train_cfg.precision}, "
                        f"device {device}); stopped before evaluating or keeping those weights")
                loss_sum.zero_()
                loss_count = 0
                metrics = evaluate(val)
                if log is not None:
                    log(step, {"train/loss": train_loss, "train/lr": lr,
                               **{f"val/{k}": v for k, v in metrics.items()}})
                bar.set_postfix(loss=f"{train_loss:.4f}", **{task.metric: f"{metrics[task.metric]:.4f}"})
                if _better(task.metric, metrics[task.metric], best_metric):
                    best_val, best_metric, best_step = metrics, metrics[task.metric], step
                    best_state = copy.deepcopy(model.state_dict())
    bar.close()
    seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    test_metrics = evaluate(test)
    if log is not None:
        log(best_step, {f"test/{k}": v for k, v in test_metrics.items()})
    return FinetuneResult(task.name, seed, task.metric, best_step, step, best_val, test_metrics,
                          len(train), len(val), len(test), seconds)
