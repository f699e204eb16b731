"""Counter-based randomness: every random choice is a pure function of (seed, purpose, epoch, sample, position).

Masks and reverse-complement flips are drawn from keys, not from a stateful generator, so a sample gets the same
mask whatever rank, worker, micro-batch or world size produced it. This is what makes a resume at another world
size reproduce the inputs exactly, and what fixes evaluation masks. The stream key comes from numpy's
``SeedSequence`` (a proper hash of the integer tuple; never Python's salted ``hash``), and per-sample / per-position
values from the splitmix64 finalizer, vectorised over whole batches.
"""
from __future__ import annotations

import numpy as np

# Purposes: one key stream each, so that e.g. the RC flip and the mask of a sample are independent.
SHARD_ORDER, BLOCK_ORDER, TRAIN_MASK, RC_FLIP, EVAL_MASK = range(5)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def stream_key(*words: int) -> np.uint64:
    """One 64-bit key for a tuple of non-negative integers (seed, purpose, epoch, ...)."""
    return np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0]


def generator(*words: int) -> np.random.Generator:
    """A numpy Generator seeded by a tuple of non-negative integers (for permutations)."""
    return np.random.default_rng(np.random.SeedSequence(list(words)))


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic); a bijection with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sample_keys(key: np.uint64, indices: np.ndarray) -> np.ndarray:
    """Per-sample 64-bit keys: a hash of (stream key, global sample index)."""
    return mix64(np.asarray(indices, dtype=np.uint64) * _GOLDEN ^ key)


def lanes16(keys: np.ndarray, length: int) -> np.ndarray:
    """[B, length] uniform uint16, one per (sample, position): the four 16-bit lanes of each word of the sample's
    splitmix64 stream (counters 1..ceil(length/4)). A quarter of the hashing of one word per position."""
    words = -(-length // 4)
    z = mix64(keys[:, None] + np.arange(1, words + 1, dtype=np.uint64) * _GOLDEN)
    return z.astype("<u8", copy=False).view("<u2")[:, :length]


def point_words(keys: np.ndarray, rows: np.ndarray, cols: np.ndarray, length: int) -> np.ndarray:
    """uint64 [n] for the (sample row, position) pairs given, from counters after those of ``lanes16``."""
    first = np.uint64(-(-length // 4) + 1)
    return mix64(keys[rows] + (np.asarray(cols, dtype=np.uint64) + first) * _GOLDEN)
