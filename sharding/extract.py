"""Phase 1: one task = read its pieces from the FASTA, cut windows, filter, write spill files.

Per task and split the kept windows go to ``task-XXXXXX.{split}.seq`` (n x L uint8 token ids, raw) and
``task-XXXXXX.{split}.meta.npy`` (start, end, region per window); ``task-XXXXXX.json`` (counts, the spills'
CRC-32s, stats) is written last and marks the task complete, so a killed run redoes at most the tasks in
flight (and the one whose files were still being written behind).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from isal import isal_zlib

from crossdna import tokens
from crossdna.fileio import write_atomic
from sharding import writeback
from sharding.config import ShardConfig
from sharding.fasta import Fasta
from sharding.regions import Piece, Region, Task, piece_range

N_HIST_BINS = 20
META_DTYPE = np.dtype([("start", "<i8"), ("end", "<i8"), ("region", "<i4")])


def empty_stats() -> dict:
    return {"windows_candidate": 0, "windows_kept": 0, "dropped": {"n_fraction": 0, "short_tail": 0},
            "n_fraction_hist": [0] * N_HIST_BINS, "gc_bases": 0, "acgt_bases": 0, "bp_covered": 0,
            "bp_input": 0, "n_bases_input": 0, "non_acgtn_letters": 0}


def add_stats(total: dict, part: dict) -> dict:
    for key, value in part.items():
        if isinstance(value, dict):
            add_stats(total[key], value)
        elif isinstance(value, list):
            total[key] = [a + b for a, b in zip(total[key], value)]
        else:
            total[key] += value
    return total


def task_marker(work: Path, index: int) -> Path:
    return work / f"task-{index:06d}.json"


def spill_paths(work: Path, index: int, split: str) -> tuple[Path, Path]:
    stem = f"task-{index:06d}.{split}"
    return work / f"{stem}.seq", work / f"{stem}.meta.npy"


# Token ids straight from the FASTA bytes (one ``bytes.translate`` pass, newlines removed in it), with one id more
# than the model's: letters other than ACGTN read as OTHER, so that they are counted before they fold into N.
OTHER = tokens.N + 1
_IDS = tokens.encode(bytes(range(256)))
_IDS[_IDS == tokens.N] = OTHER
_IDS[[ord("N"), ord("n")]] = tokens.N
TABLE = _IDS.tobytes()


_COUNT_STEP = 1 << 18  # bases counted per step: the step's masks stay in cache


def _is_n(x: np.ndarray) -> np.ndarray:
    return x >= tokens.N  # N, and OTHER before it is folded into N


def _is_gc(x: np.ndarray) -> np.ndarray:
    return x - np.uint8(1) < 2  # C = 1 or G = 2 (A = 0 wraps to 255)


def _running_counts(ids: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """N and GC bases of ``ids`` counted up to every multiple of ``cell`` bases: two int32 arrays of
    ``len(ids) // cell + 1`` (the first 0). Windows on a grid of ``cell`` are then differences of two entries:
    one row reduction over a contiguous (cells, cell) view instead of one per (overlapping) window."""
    n_cells = len(ids) // cell
    cells = ids[:n_cells * cell].reshape(n_cells, cell)
    dtype = np.uint16 if cell < 1 << 16 else np.int32  # 16-bit row sums are ~1.7x faster
    per_cell = np.empty((2, n_cells), dtype)
    step = max(1, _COUNT_STEP // cell)
    for i in range(0, n_cells, step):
        np.sum(_is_n(cells[i:i + step]), axis=1, dtype=dtype, out=per_cell[0, i:i + step])
        np.sum(_is_gc(cells[i:i + step]), axis=1, dtype=dtype, out=per_cell[1, i:i + step])
    running = np.zeros((2, n_cells + 1), np.int32)
    np.cumsum(per_cell, axis=1, out=running[:, 1:])
    return running[0], running[1]


def window_piece(fasta: Fasta, region: Region, piece: Piece, cfg: ShardConfig):
    """Windows of one piece -> (kept windows: uint8 arrays of L-byte rows, in order; meta [m]; stats)."""
    L, stride = cfg.window_length, cfg.stride
    full, tail = region.n_windows(L, stride)
    total = full + tail
    own_start, own_end = piece_range(region, piece, cfg)
    read_end = max(own_end, min(region.end, region.start + (piece.k1 - 1) * stride + L))
    ids = fasta.read(region.contig, own_start, read_end, TABLE)

    stats = empty_stats()
    own = own_end - own_start
    stats["bp_input"] = own
    if ids.max() == OTHER:  # rare (IUPAC codes): count them, then fold them into N
        stats["non_acgtn_letters"] = int(np.count_nonzero(ids[:own] == OTHER))
        ids = np.minimum(ids, tokens.N)
    cell = math.gcd(L, stride)
    n_running, gc_running = _running_counts(ids, cell)
    whole = own // cell * cell
    stats["n_bases_input"] = int(n_running[own // cell] + np.count_nonzero(_is_n(ids[whole:own])))

    n_full = max(0, min(piece.k1, full) - piece.k0)
    windows = np.lib.stride_tricks.sliding_window_view(ids, L)[: (n_full - 1) * stride + 1: stride] \
        if n_full else np.empty((0, L), np.uint8)
    starts = own_start + stride * np.arange(n_full, dtype=np.int64)
    real = np.full(n_full, L, dtype=np.int64)
    first = np.arange(n_full, dtype=np.int64) * (stride // cell)
    n_count = n_running[first + L // cell] - n_running[first]
    gc_count = gc_running[first + L // cell] - gc_running[first]
    tail_ids = None
    if tail and piece.k1 == total:  # the region's end: shorter than L, padded with N if kept
        tail_start = region.start + full * stride
        tail_real = ids[tail_start - own_start:]
        tail_ids = np.full(L, tokens.N, np.uint8)
        tail_ids[: len(tail_real)] = tail_real
        starts = np.append(starts, tail_start)
        real = np.append(real, region.end - tail_start)
        n_count = np.append(n_count, np.count_nonzero(_is_n(tail_real)))
        gc_count = np.append(gc_count, np.count_nonzero(_is_gc(tail_real)))
    ends = starts + real

    # N counted over the real bases only: padding is not sequence.
    n_frac = n_count / real
    short = real < cfg.min_tail
    too_many_n = ~short & (n_frac > cfg.max_n_fraction)
    keep = ~short & ~too_many_n
    stats["windows_candidate"] = int(len(starts))
    stats["windows_kept"] = int(keep.sum())
    stats["dropped"] = {"n_fraction": int(too_many_n.sum()), "short_tail": int(short.sum())}
    stats["n_fraction_hist"] = np.histogram(n_frac, bins=N_HIST_BINS, range=(0.0, 1.0))[0].tolist()
    stats["gc_bases"] = int(gc_count[keep].sum())
    # Padding is N, so a kept window's ACGT bases are its real bases less its N.
    stats["acgt_bases"] = int((real - n_count)[keep].sum())
    k_starts, k_ends = starts[keep], np.minimum(ends[keep], own_end)
    # Union of the kept windows inside this piece's own range (windows overlap when stride < L).
    nxt = np.append(k_starts[1:], np.iinfo(np.int64).max)
    stats["bp_covered"] = int(np.maximum(0, np.minimum(k_ends, nxt) - k_starts).sum())

    keep_full = keep[:n_full]
    kept = [windows if keep_full.all() else windows[keep_full]]
    if tail_ids is not None and keep[-1]:
        kept.append(tail_ids[None])
    meta = np.empty(len(k_starts), META_DTYPE)
    meta["start"], meta["end"], meta["region"] = k_starts, ends[keep], piece.region
    return kept, meta, stats


_CTX: tuple[tuple[Region, ...], ShardConfig, Path] | None = None


def init_extractor(regions: tuple[Region, ...], cfg: ShardConfig, work: Path) -> None:
    global _CTX
    _CTX = (regions, cfg, work)


def run_task(task: Task) -> dict:
    """Extract one task (after ``init_extractor``); returns its marker. The spill files, then the marker, are
    written behind the next task's computing (``sharding.writeback``)."""
    regions, cfg, work = _CTX
    fasta = Fasta(cfg.fasta)
    stats = {"total": empty_stats(), "by_split": {}}
    by_split: dict[str, tuple[list, list]] = {}
    for piece in task.pieces:
        region = regions[piece.region]
        kept, meta, piece_stats = window_piece(fasta, region, piece, cfg)
        add_stats(stats["total"], piece_stats)
        add_stats(stats["by_split"].setdefault(region.split, empty_stats()), piece_stats)
        seqs, metas = by_split.setdefault(region.split, ([], []))
        seqs += [np.ascontiguousarray(w).reshape(-1) for w in kept if len(w)]
        metas.append(meta)
    spills, counts, crc32 = [], {}, {}
    for split, (seqs, metas) in sorted(by_split.items()):
        seq_path, meta_path = spill_paths(work, task.index, split)
        meta = np.concatenate(metas)
        # A task that is one piece with every window kept (most of a genome) is written from the FASTA buffer.
        seq, meta_bytes = seqs[0] if len(seqs) == 1 else b"".join(seqs), _npy_bytes(meta)
        spills += [(seq_path, seq), (meta_path, meta_bytes)]
        counts[split] = len(meta)
        crc32[split] = [isal_zlib.crc32(seq), isal_zlib.crc32(meta_bytes)]
    marker = {"task": task.index, "contig": task.contig, "counts": counts, "crc32": crc32, "stats": stats}
    marker_bytes = json.dumps(marker, sort_keys=True).encode()

    def store() -> None:
        for path, data in spills:
            write_replace(path, data)
        write_atomic(task_marker(work, task.index), marker_bytes)  # last: it says the spills are complete
    writeback.submit(store)
    return marker


def write_replace(path: Path, data: bytes | np.ndarray) -> None:
    """``write_atomic`` without its fsync, for work files whose content is checked before it is trusted: the
    spills against the CRC-32s in their (fsynced) marker, a shard's record against the shard's own sha256. Spills
    live seconds on one machine: deleted before the kernel writes them back, they cost no disk time at all (and
    deleting them stays cheap; fsynced, their blocks took ~30 ms to free)."""
    write_atomic(path, data, durable=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
