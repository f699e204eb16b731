"""The global sample order: a pure function of (seed, epoch, shard sizes, block size, global batch, tail policy).

Nothing here reads data or depends on the number of ranks or workers.

* Epoch order. The shards of the split are permuted by (seed, epoch); consecutive groups of ``block_shards``
  shards of that permutation form blocks, and the samples of each block are permuted by (seed, epoch, block).
  The epoch order is the concatenation of the blocks, a permutation of all N samples of the split. Reading
  stays local (a few shards at a time) while batches still mix samples of several shards. Samples were already
  shuffled globally when the shards were built.
* Global stream. Epoch orders are concatenated into one infinite stream of global sample indices. With
  ``tail='drop'`` each epoch contributes its first ``(N // G) * G`` positions, so a global batch never spans two
  epochs; with ``tail='wrap'`` each epoch contributes all N and a batch may end in the next epoch.
* Global batch g is stream positions ``[g*G, (g+1)*G)``, G = world * micro * accum. Within it, sample j belongs to
  accumulation step ``j // (world*micro)`` and rank ``(j // micro) % world``: every accumulation step is a
  contiguous run of the stream, cut into ``world`` consecutive micro-batches. The set of samples of a global batch
  (and their order in the stream) is the same at any world size, which is what makes resuming on a different
  topology exact.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Literal

import numpy as np

from .keys import BLOCK_ORDER, SHARD_ORDER, generator


class EpochOrder:
    """Maps positions of one epoch to global sample indices; blocks are permuted lazily and cached."""

    _CACHED_BLOCKS = 4

    def __init__(self, shard_sizes: np.ndarray, seed: int, epoch: int, block_shards: int) -> None:
        self.seed, self.epoch = seed, epoch
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.shard_sizes = sizes
        shard_perm = generator(seed, SHARD_ORDER, epoch).permutation(len(sizes))
        self.blocks = [shard_perm[i:i + block_shards] for i in range(0, len(sizes), block_shards)]
        block_sizes = np.array([sizes[b].sum() for b in self.blocks], dtype=np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(block_sizes)])
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def num_samples(self) -> int:
        return int(self.block_starts[-1])

    def block(self, b: int) -> np.ndarray:
        """Global sample indices of block ``b`` in their epoch order."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        members = np.concatenate([np.arange(self.shard_starts[s], self.shard_starts[s] + self.shard_sizes[s])
                                  for s in self.blocks[b]])
        order = generator(self.seed, BLOCK_ORDER, self.epoch, b).permutation(members)
        self._cache[b] = order
        if len(self._cache) > self._CACHED_BLOCKS:
            self._cache.popitem(last=False)
        return order

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Global sample indices at ``positions`` (0 <= position < num_samples) of this epoch's order."""
        positions = np.asarray(positions, dtype=np.int64)
        blocks = np.searchsorted(self.block_starts, positions, side="right") - 1
        out = np.empty_like(positions)
        for b in np.unique(blocks):
            here = blocks == b
            out[here] = self.block(int(b))[positions[here] - self.block_starts[b]]
        return out

    def full(self) -> np.ndarray:
        return np.concatenate([self.block(b) for b in range(len(self.blocks))])


@dataclasses.dataclass(frozen=True)
class GlobalSchedule:
    """The infinite global stream cut into global batches, and its (epoch, consumed) coordinates."""

    num_samples: int
    global_batch: int
    tail: Literal["drop", "wrap"]

    def __post_init__(self) -> None:
        if self.global_batch > self.num_samples:
            raise ValueError(f"global batch {self.global_batch} is larger than the split ({self.num_samples} "
                             "samples): lower micro_batch, grad_accum or world size")

    @property
    def samples_per_epoch(self) -> int:
        """Stream positions taken from each epoch's order."""
        if self.tail == "drop":
            return (self.num_samples // self.global_batch) * self.global_batch
        return self.num_samples

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: exact with ``drop``; with ``wrap`` the rounded-up average (an epoch's last
        step also holds samples of the next epoch)."""
        return -(-self.samples_per_epoch // self.global_batch)

    def locate(self, stream_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions -> (epoch, position within that epoch's order)."""
        return np.divmod(np.asarray(stream_positions, dtype=np.int64), self.samples_per_epoch)

    def to_state(self, stream_position: int) -> tuple[int, int]:
        epoch, consumed = divmod(stream_position, self.samples_per_epoch)
        return int(epoch), int(consumed)

    def from_state(self, epoch: int, consumed: int) -> int:
        if not 0 <= consumed < self.samples_per_epoch or epoch < 0:
            raise ValueError(f"data state epoch={epoch} consumed={consumed} is outside this split's schedule "
                             f"({self.samples_per_epoch} samples per epoch)")
        position = epoch * self.samples_per_epoch + consumed
        if position % self.global_batch:
            raise ValueError(f"data state consumed={consumed} (epoch {epoch}) is not at a global-batch boundary "
                             f"of {self.global_batch} samples")
        return position


@dataclasses.dataclass(frozen=True)
class RankSlicer:
    """Which stream positions make up micro-batch ``t`` of one rank (t counts micro-batches from the stream start)."""

    world_size: int
    rank: int
    micro_batch: int
    grad_accum: int

    def __post_init__(self) -> None:
        for name in ("world_size", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}), got {self.rank}")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    def positions(self, t: int) -> np.ndarray:
        step, accum_step = divmod(t, self.grad_accum)
        start = (step * self.global_batch + accum_step * self.world_size * self.micro_batch
                 + self.rank * self.micro_batch)
        return np.arange(start, start + self.micro_batch, dtype=np.int64)
