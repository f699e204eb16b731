"""``PretrainStream`` (infinite, resumable training batches) and ``EvalStream`` (one exact pass, fixed masks).

Batches are dicts of CPU tensors: ``input_ids`` int64 [B, L] (corrupted), ``labels`` int64 [B, L] (clean ids),
``loss_mask`` bool [B, L] (the positions to score), ``index`` int64 [B] (global sample index in the split), and
for evaluation ``valid`` bool [B] (False on padding rows, whose ``loss_mask`` is all False).

Workers. With ``num_workers = W`` worker w builds this rank's micro-batches w, w+W, w+2W, ...; torch's DataLoader
requests batches from workers round-robin and returns them in request order, so the main process sees micro-
batches in order (tested against ``num_workers=0``). Workers read ahead (``prefetch_factor``) but the state only
counts batches the consumer has taken from the iterator.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .keys import EVAL_MASK, RC_FLIP, TRAIN_MASK, sample_keys, stream_key
from .masking import Masker, rc_flips, reverse_complement_rows
from .order import EpochOrder, GlobalSchedule, RankSlicer
from .shards import ShardReader, SplitShards

_STATE_KEYS = ("epoch", "consumed", "seed", "manifest_hash", "global_batch", "tail", "shuffle_block_shards")


def _batch(clean: np.ndarray, keys: np.ndarray, masker: Masker, indices: np.ndarray) -> dict[str, torch.Tensor]:
    corrupted, loss_mask = masker(clean, keys)
    return {
        "input_ids": torch.from_numpy(corrupted.astype(np.int64)),
        "labels": torch.from_numpy(clean.astype(np.int64)),
        "loss_mask": torch.from_numpy(loss_mask),
        "index": torch.from_numpy(indices.astype(np.int64)),
    }


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _loader(dataset: IterableDataset, cfg: DataConfig) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=None, num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
    )


class _TrainBatches(IterableDataset):
    """One rank's micro-batches from micro-batch ``start`` on, split over DataLoader workers."""

    def __init__(self, shards: SplitShards, cfg: DataConfig, schedule: GlobalSchedule, slicer: RankSlicer,
                 start: int) -> None:
        self.shards, self.cfg, self.schedule, self.slicer, self.start = shards, cfg, schedule, slicer, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = _worker()
        cfg = self.cfg
        reader = ShardReader(self.shards, 2 * cfg.shuffle_block_shards, cfg.verify_checksums)
        masker = Masker(cfg)
        orders: OrderedDict[int, EpochOrder] = OrderedDict()  # a wrapped batch touches two epochs

        def order(epoch: int) -> EpochOrder:
            if epoch not in orders:
                orders[epoch] = EpochOrder(self.shards.sizes, cfg.seed, epoch, cfg.shuffle_block_shards)
                if len(orders) > 2:
                    orders.popitem(last=False)
            return orders[epoch]

        for t in itertools.count(self.start + worker, workers):
            epochs, positions = self.schedule.locate(self.slicer.positions(t))
            indices = np.empty_like(positions)
            mask_keys = np.empty(len(positions), dtype=np.uint64)
            flip = np.zeros(len(positions), dtype=bool)
            for epoch in np.unique(epochs):
                here, e = epochs == epoch, int(epoch)
                indices[here] = order(e).indices(positions[here])
                mask_keys[here] = sample_keys(stream_key(cfg.seed, TRAIN_MASK, e), indices[here])
                if cfg.rc_augment:
                    flip[here] = rc_flips(sample_keys(stream_key(cfg.seed, RC_FLIP, e), indices[here]))
            clean = reader.gather(indices)
            if cfg.rc_augment:
                clean = reverse_complement_rows(clean, flip)
            yield _batch(clean, mask_keys, masker, indices)


class PretrainStream:
    """Infinite training stream of one rank: ``for batch in stream`` yields micro-batches; ``grad_accum`` of them
    make one optimizer step. ``state_dict()`` (at a step boundary) and ``load_state_dict()`` resume the exact
    global sequence, also with another world size, micro-batch or worker count of the same global batch."""

    def __init__(self, manifest_path: str | Path, split: str, cfg: DataConfig, rank: int, world_size: int,
                 micro_batch: int, grad_accum: int) -> None:
        self.cfg = cfg
        self.shards = SplitShards.open(manifest_path, split)
        self.slicer = RankSlicer(world_size, rank, micro_batch, grad_accum)
        self.schedule = GlobalSchedule(self.shards.num_samples, self.slicer.global_batch, cfg.tail)
        self._micro = 0       # micro-batches of this rank taken by the consumer since the stream start
        self._generation = 0  # bumped by __iter__ / load_state_dict: an older iterator must not go on counting

    @property
    def global_batch(self) -> int:
        return self.slicer.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def manifest_hash(self) -> str:
        return self.shards.manifest_hash

    @property
    def epoch(self) -> int:
        """Epoch of the current optimizer step (for logging)."""
        return self.schedule.to_state(self._micro // self.slicer.grad_accum * self.global_batch)[0]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._generation += 1
        generation = self._generation
        dataset = _TrainBatches(self.shards, self.cfg, self.schedule, self.slicer, self._micro)
        for batch in _loader(dataset, self.cfg):
            if generation != self._generation:
                raise RuntimeError("this PretrainStream was re-iterated or reloaded; use the newest iterator")
            self._micro += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        accum = self.slicer.grad_accum
        if self._micro % accum:
            raise RuntimeError(f"PretrainStream.state_dict() in the middle of an optimizer step "
                               f"({self._micro % accum} of {accum} micro-batches taken); save after the step")
        epoch, consumed = self.schedule.to_state(self._micro // accum * self.global_batch)
        return {"epoch": epoch, "consumed": consumed, "seed": self.cfg.seed, "manifest_hash": self.manifest_hash,
                "global_batch": self.global_batch, "tail": self.cfg.tail,
                "shuffle_block_shards": self.cfg.shuffle_block_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"data state: missing {missing} (has {sorted(state)})")
        if state["manifest_hash"] != self.manifest_hash:
            raise ValueError(
                f"data state: saved for manifest hash {state['manifest_hash']}, but {self.shards.manifest_path} "
                f"hashes to {self.manifest_hash}; refusing to resume on different shards (point data.path at the "
                "shards the run started with, or start a new run)")
        for key, mine in (("seed", self.cfg.seed), ("global_batch", self.global_batch), ("tail", self.cfg.tail),
                          ("shuffle_block_shards", self.cfg.shuffle_block_shards)):
            if state[key] != mine:
                raise ValueError(f"data state: saved with {key}={state[key]!r}, this run has {mine!r}; the sample "
                                 f"order would differ (set it back to {state[key]!r} to resume)")
        position = self.schedule.from_state(int(state["epoch"]), int(state["consumed"]))
        self._micro = position // self.global_batch * self.slicer.grad_accum
        self._generation += 1


class _EvalBatches(IterableDataset):
    """One rank's evaluation batches: a contiguous range of the split, padded to the common batch count."""

    def __init__(self, shards: SplitShards, cfg: DataConfig, rank: int, world_size: int, batch: int) -> None:
        self.shards, self.cfg, self.batch = shards, cfg, batch
        total = shards.num_samples
        self.per_rank = -(-total // world_size)
        self.first = min(rank * self.per_rank, total)
        self.end = min(self.first + self.per_rank, total)
        self.num_batches = -(-self.per_rank // batch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = _worker()
        reader = ShardReader(self.shards, 2, self.cfg.verify_checksums)
        masker = Masker(self.cfg)
        key = stream_key(self.cfg.eval_mask_seed, EVAL_MASK)
        for b in range(worker, self.num_batches, workers):
            indices = self.first + np.arange(b * self.batch, (b + 1) * self.batch, dtype=np.int64)
            valid = indices < self.end
            # Padding rows repeat a real sample (the model sees ordinary input) and are never scored.
            indices = np.where(valid, indices, self.first if self.first < self.end else 0)
            clean = reader.gather(indices)
            out = _batch(clean, sample_keys(key, indices), masker, indices)
            out["loss_mask"] &= torch.from_numpy(valid)[:, None]
            out["valid"] = torch.from_numpy(valid)
            yield out


class EvalStream:
    """One pass over a split for one rank, with masks fixed by (eval_mask_seed, sample index). Every rank yields
    ``len(stream)`` batches of exactly ``batch`` rows; each sample of the split is valid on exactly one rank, so
    summing per-position metrics over ``loss_mask`` (and per-sample ones over ``valid``) across ranks is exact."""

    def __init__(self, manifest_path: str | Path, split: str, cfg: DataConfig, rank: int, world_size: int,
                 batch: int) -> None:
        if batch < 1:
            raise ValueError(f"batch: must be >= 1, got {batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        self.shards = SplitShards.open(manifest_path, split)
        self._dataset = _EvalBatches(self.shards, cfg, rank, world_size, batch)
        self._loader = _loader(self._dataset, cfg)

    @property
    def num_samples(self) -> int:
        """Samples of the split (over all ranks)."""
        return self.shards.num_samples

    def __len__(self) -> int:
        return self._dataset.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self._loader)
