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
from isal import isal_zlib

from crossdna.fileio import write_atomic
from sharding import writeback
from sharding.extract import META_DTYPE, spill_paths, task_marker, write_replace
from sharding.regions import Region
from sharding.tarwrite import encode_shard, shard_nbytes


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
    """Per-process state of a shard writer: region JSON fragments, the open spill maps, two tar buffers."""

    def __init__(self, out: Path, work: Path, regions: tuple[Region, ...], length: int,
                 crc32: dict[tuple[int, str], tuple[int, int]]):
        self.out, self.work, self.length, self.crc32 = out, work, length, crc32
        self.chrom = [json.dumps(r.contig) for r in regions]
        self.interval = [json.dumps(list(r.interval), separators=(",", ":")) if r.interval else "null"
                         for r in regions]
        self.maps: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        # Used in turn: the writeback thread writes the previous shard from one while the next shard is built in
        # the other (it has one write in flight, so the buffer of the shard before that is free). Reusing them
        # spares a fresh 10 MB allocation, and its page faults, per shard.
        self.buffers = [np.empty(0, np.uint8), np.empty(0, np.uint8)]

    def spill(self, task: int, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        key = (task, split)
        if key not in self.maps:
            if any(s != split for _, s in self.maps):
                self.maps.clear()  # jobs come split by split: keep one split's maps (2 fds per task) open
            seq_path, meta_path = spill_paths(self.work, task, split)
            seqs = np.memmap(seq_path, dtype=np.uint8, mode="r", shape=(count, self.length))
            # The spills are not fsynced (sharding.extract.write_replace): check those that another process
            # wrote against their marker.
            expected = self.crc32.get(key)
            if expected and (isal_zlib.crc32(seqs), isal_zlib.crc32(meta_path.read_bytes())) != expected:
                raise ValueError(f"{seq_path}: content does not match its marker (lost in a crash?); delete "
                                 f"{task_marker(self.work, task).name} to redo the task, then merge again")
            # Plain views of the maps: numpy.memmap's indexing is ~10x slower on these small gathers.
            self.maps[key] = (seqs.view(np.ndarray), np.load(meta_path, mmap_mode="r").view(np.ndarray))
        return self.maps[key]

    def buffer(self, nbytes: int) -> np.ndarray:
        self.buffers.reverse()
        if len(self.buffers[0]) < nbytes:
            self.buffers[0] = np.empty(nbytes, np.uint8)
        return self.buffers[0]


_CTX: _Context | None = None


def init_writer(out: Path, work: Path, regions: tuple[Region, ...], length: int,
                crc32: dict[tuple[int, str], tuple[int, int]]) -> None:
    """Per writer process: ``crc32`` maps (task, split) to the CRC-32s (seq, meta) of the spills to check."""
    global _CTX
    _CTX = _Context(out, work, regions, length, crc32)
    # hg38 has ~400 extraction tasks and each open memmap holds a file descriptor: lift the soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _gather(job: ShardJob) -> tuple[np.ndarray, np.ndarray]:
    ctx = _CTX
    counts = np.array([c for _, c in job.sources], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = np.argsort(job.rows)  # read each spill in file order
    rows = job.rows[order]
    bounds = np.searchsorted(rows, offsets)  # rows[bounds[s]:bounds[s + 1]] come from source s
    seqs = np.empty((len(rows), ctx.length), np.uint8)
    meta = np.empty(len(rows), META_DTYPE)
    for src in np.flatnonzero(np.diff(bounds)):
        task, count = job.sources[src]
        at, local = order[bounds[src]:bounds[src + 1]], rows[bounds[src]:bounds[src + 1]] - offsets[src]
        spill_seqs, spill_meta = ctx.spill(task, job.split, count)
        seqs[at] = spill_seqs[local]
        meta[at] = spill_meta[local]
    return seqs, meta


def _sample_json(ctx: _Context, meta: np.ndarray, first_index: int) -> list[str]:
    chrom, interval = ctx.chrom, ctx.interval
    return [f'{{"chrom":{chrom[r]},"start":{s},"end":{e},"strand":"+","interval":{interval[r]},"index":{i}}}'
            for i, s, e, r in zip(range(first_index, first_index + len(meta)), meta["start"].tolist(),
                                  meta["end"].tolist(), meta["region"].tolist())]


def _done(ctx: _Context, job: ShardJob) -> dict | None:
    """The shard's completion record if the file on disk still matches it (resume skips it)."""
    try:
        record = json.loads(record_path(ctx.work, job.split, job.k).read_text())
    except (OSError, ValueError):  # none yet, or torn by a crash (records are not fsynced: see store below)
        return None
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
    out = ctx.buffer(shard_nbytes(len(job.rows), ctx.length))
    data = encode_shard(job.first_index, seqs, _sample_json(ctx, meta, job.first_index), out)
    rel = shard_path(job.split, job.k)
    record = {"path": rel, "samples": len(job.rows), "bytes": data.nbytes,
              "sha256": hashlib.sha256(data).hexdigest()}
    record_file = record_path(ctx.work, job.split, job.k)

    def store() -> None:
        write_atomic(ctx.out / rel, data)
        # The record is written only after the shard is in place: a record always describes a complete shard.
        # Resume trusts it only if the shard's bytes still hash to it, so it needs no fsync of its own.
        write_replace(record_file, json.dumps(record).encode())
    writeback.submit(store)  # behind the next shard's building; the merge drains every worker before the manifest
    return record


def shard_jobs(split: str, sources: tuple[tuple[int, int], ...], per_shard: int, seed: int) -> list[ShardJob]:
    n = sum(c for _, c in sources)
    perm = split_permutation(n, seed, split)
    return [ShardJob(split, k, lo, perm[lo:lo + per_shard], sources)
            for k, lo in enumerate(range(0, n, per_shard))]
