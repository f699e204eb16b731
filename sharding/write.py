"""Phase 2: permute every split with a seeded permutation and write equal-count tar shards from the spills.

Sample ``i`` of a split (its global index, the tar key) is window ``perm[i]`` of the split's windows in plan
order (contig, region, window), with ``perm = Generator(PCG64(SeedSequence([seed, crc32(split)]))).permutation``.
The shuffle is therefore global over the whole split and a pure function of (seed, plan), not of the worker
count or of how Slurm parts divided the extraction. Shard ``k`` holds samples [k*S, (k+1)*S): each writer
gathers its S rows from the memory-mapped spills, so resident memory is O(S * L) per writer plus the page cache.
"""
from __future__ import annotations

import hashlib
import json
import resource
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossdna.fileio import write_atomic
from sharding.extract import META_DTYPE, spill_paths
from sharding.regions import Region
from sharding.tarwrite import encode_shard


def split_permutation(n: int, seed: int, split: str) -> np.ndarray:
    seq = np.random.SeedSequence([seed, zlib.crc32(split.encode())])
    return np.random.Generator(np.random.PCG64(seq)).permutation(n)


def shard_path(split: str, k: int) -> str:
    return f"{split}/shard-{k:06d}.tar"


def record_path(work: Path, split: str, k: int) -> Path:
    return work / "shards" / f"{split}-{k:06d}.json"


@dataclass(frozen=True)
class ShardJob:
    split: str
    k: int
    first_index: int
    rows: np.ndarray                       # source rows (plan order) of samples first_index, first_index + 1, ...
    sources: tuple[tuple[int, int], ...]   # (task index, windows of this split) in plan order


class _Context:
    """Per-process state of a shard writer: region JSON fragments and the open spill memmaps."""

    def __init__(self, out: Path, work: Path, regions: tuple[Region, ...], length: int):
        self.out, self.work, self.length = out, work, length
        self.chrom = [json.dumps(r.contig) for r in regions]
        self.interval = [json.dumps(list(r.interval), separators=(",", ":")) if r.interval else "null"
                         for r in regions]
        self.maps: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

    def spill(self, task: int, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        key = (task, split)
        if key not in self.maps:
            if any(s != split for _, s in self.maps):
                self.maps.clear()  # jobs come split by split: keep one split's maps (2 fds per task) open
            seq_path, meta_path = spill_paths(self.work, task, split)
            seqs = np.memmap(seq_path, dtype=np.uint8, mode="r", shape=(count, self.length))
            self.maps[key] = (seqs, np.load(meta_path, mmap_mode="r"))
        return self.maps[key]


_CTX: _Context | None = None


def init_writer(out: Path, work: Path, regions: tuple[Region, ...], length: int) -> None:
    global _CTX
    _CTX = _Context(out, work, regions, length)
    # hg38 has ~400 extraction tasks and each open memmap holds a file descriptor: lift the soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _gather(job: ShardJob) -> tuple[np.ndarray, np.ndarray]:
    ctx = _CTX
    counts = np.array([c for _, c in job.sources], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    owner = np.searchsorted(offsets, job.rows, side="right") - 1
    seqs = np.empty((len(job.rows), ctx.length), np.uint8)
    meta = np.empty(len(job.rows), META_DTYPE)
    for src in np.unique(owner):
        task, count = job.sources[src]
        sel = np.flatnonzero(owner == src)
        local = job.rows[sel] - offsets[src]
        spill_seqs, spill_meta = ctx.spill(task, job.split, count)
        order = np.argsort(local)  # read each spill in file order
        seqs[sel[order]] = spill_seqs[local[order]]
        meta[sel[order]] = spill_meta[local[order]]
    return seqs, meta


def _sample_json(ctx: _Context, meta: np.ndarray, first_index: int) -> list[bytes]:
    chrom, interval = ctx.chrom, ctx.interval
    return [(f'{{"chrom":{chrom[r]},"start":{s},"end":{e},"strand":"+","interval":{interval[r]},'
             f'"index":{first_index + i}}}').encode()
            for i, (s, e, r) in enumerate(zip(meta["start"].tolist(), meta["end"].tolist(),
                                              meta["region"].tolist()))]


def _done(ctx: _Context, job: ShardJob) -> dict | None:
    """The shard's completion record if the file on disk still matches it (resume skips it)."""
    record_file = record_path(ctx.work, job.split, job.k)
    if not record_file.exists():
        return None
    record = json.loads(record_file.read_text())
    shard = ctx.out / record["path"]
    if not shard.exists() or shard.stat().st_size != record["bytes"]:
        return None
    return record if hashlib.sha256(shard.read_bytes()).hexdigest() == record["sha256"] else None


def write_shard(job: ShardJob) -> dict:
    ctx = _CTX
    record = _done(ctx, job)
    if record is not None:
        return record
    seqs, meta = _gather(job)
    data = encode_shard(job.first_index, seqs, _sample_json(ctx, meta, job.first_index))
    rel = shard_path(job.split, job.k)
    write_atomic(ctx.out / rel, data)
    record = {"path": rel, "samples": len(job.rows), "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest()}
    # The record is written only after the shard is in place: a record always describes a complete shard.
    write_atomic(record_path(ctx.work, job.split, job.k), json.dumps(record).encode())
    return record


def shard_jobs(split: str, sources: tuple[tuple[int, int], ...], per_shard: int, seed: int) -> list[ShardJob]:
    n = sum(c for _, c in sources)
    perm = split_permutation(n, seed, split)
    return [ShardJob(split, k, lo, perm[lo:lo + per_shard], sources)
            for k, lo in enumerate(range(0, n, per_shard))]
