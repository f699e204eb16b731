"""From task files to model batches: split loading (with the validation carve-out), encoding, padding.

Sequences are encoded once into a padded uint8 id matrix plus a length vector; batches are index slices of it, so
an epoch costs no Python work per sequence. Pads are N (id 4), the id upstream pads with (spec §1.2); the attention
mask tells the pooling which positions are real.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crossdna import tokens
from crossdna.finetune.config import BenchmarkConfig, TaskConfig, TrainConfig
from crossdna.finetune.readers import TaskData, TaskDataError, read_split

PAD_ID = tokens.N


@dataclass
class TaskSplits:
    train: TaskData
    val: TaskData
    test: TaskData
    num_outputs: int  # classes (multiclass) or label columns (multilabel, regression)


def _stratified_split(labels: np.ndarray, fraction: float, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, take) with ``take`` ≈ ``fraction`` of each class (or of all rows), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if stratify else [np.arange(len(labels))]
    take = []
    for idx in groups:
        n = int(round(fraction * len(idx)))
        take.append(rng.permutation(idx)[:n])
    take = np.sort(np.concatenate(take))
    keep = np.setdiff1d(np.arange(len(labels)), take)
    return keep, take


def load_splits(cfg: BenchmarkConfig, task: TaskConfig) -> TaskSplits:
    def read(path: str) -> TaskData:
        return read_split(cfg.resolve(path), task.format, task.kind, task.sequence_column, task.label_columns,
                          task.where, task.letters)

    train, test = read(task.train), read(task.test)
    stratify = task.kind == "multiclass"
    if task.val is not None:
        val = read(task.val)
    else:
        keep, take = _stratified_split(train.labels, task.val_fraction, task.split_seed, stratify)
        if len(take) == 0 or len(keep) == 0:
            raise TaskDataError(f"{cfg.resolve(task.train)}: {len(train)} rows are too few to carve a "
                                f"{task.val_fraction:.0%} validation split")
        train, val = train.subset(keep), train.subset(take)
    if task.max_train_samples is not None and task.max_train_samples < len(train):
        keep, _ = _stratified_split(train.labels, 1 - task.max_train_samples / len(train), task.split_seed, stratify)
        train = train.subset(keep)
    if task.kind == "multiclass":
        num = task.num_labels or int(train.labels.max()) + 1
        for name, split in (("train", train), ("val", val), ("test", test)):
            bad = np.flatnonzero(split.labels >= num)
            if len(bad):
                raise TaskDataError(f"{split.origin[bad[0]]}: label {split.labels[bad[0]]} >= num_labels={num} "
                                    f"({name} split; set task.num_labels if train lacks a class)")
    else:
        num = train.labels.shape[1]
    return TaskSplits(train, val, test, num)


@dataclass
class EncodedSplit:
    """Padded ids [N, L] (uint8), real-position mask [N, L] (bool), labels."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, index: torch.Tensor, pad_to_longest: bool) -> dict[str, torch.Tensor]:
        ids, mask = self.ids[index], self.mask[index]
        if pad_to_longest:  # drop the columns that are padding in every row of this batch
            cols = mask.any(0)
            ids, mask = ids[:, cols], mask[:, cols]
        return {"input_ids": ids.long(), "attention_mask": mask, "labels": self.labels[index]}


def encode(data: TaskData, max_length: int, train_cfg: TrainConfig) -> EncodedSplit:
    n = len(data)
    ids = np.full((n, max_length), PAD_ID, dtype=np.uint8)
    mask = np.zeros((n, max_length), dtype=bool)
    for i, seq in enumerate(data.sequences):
        x = tokens.encode(seq)
        if len(x) > max_length:
            cut = len(x) - max_length
            start = {"right": 0, "left": cut, "center": cut // 2}[train_cfg.truncation]
            x = x[start:start + max_length]
        if train_cfg.padding_side == "right":
            ids[i, :len(x)], mask[i, :len(x)] = x, True
        else:
            ids[i, max_length - len(x):], mask[i, max_length - len(x):] = x, True
    labels = torch.from_numpy(data.labels)
    return EncodedSplit(torch.from_numpy(ids), torch.from_numpy(mask), labels)
