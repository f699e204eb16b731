"""A split's shards: the manifest's view of them, and a per-process reader with checksums and a small cache."""
from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from crossdna.tokens import NUM_BASES

from .tarindex import TarFormatError, index_seq_members


# Per process, keyed by (path, manifest sha256): shards whose checksum was verified, and their tar layouts. A
# shard is hashed and indexed once per process, however many readers (one per training iteration, per
# evaluation pass) open it; forked DataLoader workers inherit both.
_VERIFIED: set[tuple[str, str]] = set()
_LAYOUTS: dict[tuple[str, str], "_Layout"] = {}


class ShardError(ValueError):
    """A shard is missing, truncated, corrupt or disagrees with the manifest; the message names it."""


@dataclasses.dataclass(frozen=True)
class SplitShards:
    """What the manifest declares about one split: enough to compute the order without reading any data."""

    manifest_path: Path
    manifest_hash: str
    split: str
    window_length: int
    paths: tuple[Path, ...]
    sizes: np.ndarray       # samples per shard
    starts: np.ndarray      # global index of each shard's first sample
    nbytes: tuple[int, ...]
    sha256: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1] + self.sizes[-1])

    @classmethod
    def open(cls, path: str | Path, split: str) -> "SplitShards":
        """Loads and validates the manifest (a file, or a directory holding ``manifest.json``)."""
        from sharding.manifest import load_manifest, manifest_hash

        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        manifest = load_manifest(path)
        splits = manifest["splits"]
        if split not in splits:
            raise ValueError(f"{path}: no split {split!r} (the manifest has {sorted(splits)})")
        shards = splits[split]["shards"]
        if not shards:
            raise ValueError(f"{path}: split {split!r} has no shards")
        sizes = np.array([s["samples"] for s in shards], dtype=np.int64)
        return cls(
            manifest_path=path, manifest_hash=manifest_hash(manifest), split=split,
            window_length=int(manifest["window_length"]),
            paths=tuple(path.parent / s["path"] for s in shards), sizes=sizes,
            starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]),
            nbytes=tuple(int(s["bytes"]) for s in shards), sha256=tuple(s["sha256"] for s in shards),
        )

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (shard number, position within the shard)."""
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return shard, indices - self.starts[shard]


class ShardReader:
    """Gathers samples by global index from memory-mapped shards.

    The first time a process opens a shard it reads it whole: sha256 (``verify_checksums``) and the tar index
    both stream over the file once. The index is remembered per process (two integers for the sharder's evenly
    spaced layout), so later opens of the shard, e.g. every epoch, touch only the pages of the samples this
    worker gathers, a fraction ``1 / (world_size * num_workers)`` of the file. The byte size is checked against
    the manifest on every open. The last ``cache_shards`` shards stay mapped. Each DataLoader worker has its own.
    """

    def __init__(self, shards: SplitShards, cache_shards: int, verify_checksums: bool) -> None:
        self.shards = shards
        self.cache_shards = cache_shards
        self.verify_checksums = verify_checksums
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Clean token ids uint8 [len(indices), L] of the given global sample indices."""
        shard_of, offset = self.shards.locate(indices)
        out = np.empty((len(indices), self.shards.window_length), dtype=np.uint8)
        for s in np.unique(shard_of):
            rows = shard_of == s
            out[rows] = self._open(int(s))[offset[rows]]
        if out.max(initial=0) >= NUM_BASES:
            bad = int(shard_of[np.flatnonzero(out.max(axis=1) >= NUM_BASES)[0]])
            raise ShardError(f"{self.shards.paths[bad]}: holds token ids >= {NUM_BASES} (corrupt shard)")
        return out

    def _open(self, s: int) -> np.ndarray:
        """Shard ``s`` as a read-only [samples, L] array over its mapped bytes."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        path = self.shards.paths[s]
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != self.shards.nbytes[s]:
                    raise ShardError(f"{path}: {size} bytes, the manifest says {self.shards.nbytes[s]} (truncated?)")
                data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        except FileNotFoundError:
            raise ShardError(f"{path}: shard listed in {self.shards.manifest_path} is missing") from None
        except OSError as e:
            raise ShardError(f"{path}: cannot read shard: {e.strerror}") from e
        identity = (str(path), self.shards.sha256[s])
        if self.verify_checksums and identity not in _VERIFIED:
            digest = hashlib.sha256(data).hexdigest()
            if digest != identity[1]:
                raise ShardError(f"{path}: sha256 {digest} does not match the manifest's {identity[1]} "
                                 "(corrupt shard; verify_checksums=false skips this check)")
            _VERIFIED.add(identity)
        if identity not in _LAYOUTS:
            _LAYOUTS[identity] = self._index(s, data)
        samples = _LAYOUTS[identity].rows(data, self.shards.window_length)
        self._cache[s] = samples
        if len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return samples

    def _index(self, s: int, data: np.ndarray) -> "_Layout":
        path = self.shards.paths[s]
        try:
            keys, payloads = index_seq_members(data, self.shards.window_length)
        except TarFormatError as e:
            raise ShardError(f"{path}: {e}") from None
        first, count = int(self.shards.starts[s]), int(self.shards.sizes[s])
        if len(keys) != count or (keys != np.arange(first, first + count)).any():
            raise ShardError(f"{path}: holds {len(keys)} samples keyed {keys[:1].tolist()}..{keys[-1:].tolist()}, "
                             f"the manifest says {count} samples keyed {first}..{first + count - 1}")
        return _Layout.of(payloads)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Byte offsets of a shard's ``.seq`` payloads: ``first + i * stride`` (the sharder's layout: every sample's
    json fits one block) or, for archives written otherwise, an explicit array."""

    first: int
    stride: int
    count: int
    offsets: np.ndarray | None

    @classmethod
    def of(cls, payloads: np.ndarray) -> "_Layout":
        steps = np.diff(payloads)
        if len(payloads) == 1 or (steps == steps[0]).all():
            stride = int(steps[0]) if len(payloads) > 1 else 0
            return cls(int(payloads[0]), stride, len(payloads), None)
        return cls(0, 0, len(payloads), payloads)

    def rows(self, data: np.ndarray, length: int) -> np.ndarray:
        if self.offsets is None:  # a view: gathering touches only the pages of the rows taken
            return np.lib.stride_tricks.as_strided(data[self.first:], shape=(self.count, length),
                                                   strides=(self.stride, 1), writeable=False)
        return data[self.offsets[:, None] + np.arange(length)]
