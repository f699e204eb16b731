"""Phase 1: one task = read its pieces from the FASTA, cut windows, filter, write spill files.

Per task and split the kept windows go to ``task-XXXXXX.{split}.seq`` (n x L uint8 token ids, raw) and
``task-XXXXXX.{split}.meta.npy`` (start, end, region per window); ``task-XXXXXX.json`` (counts + stats) is
written last and marks the task complete, so a killed run redoes at most the tasks in flight.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from crossdna import tokens
from crossdna.fileio import write_atomic
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


def window_piece(fasta: Fasta, region: Region, piece: Piece, cfg: ShardConfig):
    """Windows of one piece -> (ids [m, L] uint8, meta [m], stats)."""
    L, stride = cfg.window_length, cfg.stride
    full, tail = region.n_windows(L, stride)
    total = full + tail
    own_start, own_end = piece_range(region, piece, cfg)
    read_end = max(own_end, min(region.end, region.start + (piece.k1 - 1) * stride + L))
    raw = fasta.read(region.contig, own_start, read_end)

    ids = tokens.encode(raw)
    stats = empty_stats()
    own = slice(0, own_end - own_start)
    stats["bp_input"] = own_end - own_start
    stats["n_bases_input"] = int(np.count_nonzero(ids[own] == tokens.N))
    # Letters folded into N are the N ids that were not an 'N'/'n' in the FASTA ((byte | 0x20) == 'n').
    stats["non_acgtn_letters"] = stats["n_bases_input"] - int(np.count_nonzero((raw[own] | 0x20) == ord("n")))

    n_full = max(0, min(piece.k1, full) - piece.k0)
    windows = np.lib.stride_tricks.sliding_window_view(ids, L)[: (n_full - 1) * stride + 1: stride] \
        if n_full else np.empty((0, L), np.uint8)
    starts = own_start + stride * np.arange(n_full, dtype=np.int64)
    real = np.full(n_full, L, dtype=np.int64)
    if tail and piece.k1 == total:  # the region's end: shorter than L, padded with N if kept
        tail_start = region.start + full * stride
        tail_ids = np.full(L, tokens.N, np.uint8)
        tail_ids[: region.end - tail_start] = ids[tail_start - own_start:]
        windows = np.concatenate([windows, tail_ids[None]])
        starts = np.append(starts, tail_start)
        real = np.append(real, region.end - tail_start)
    ends = starts + real

    # N counted over the real bases only: padding is not sequence.
    n_count = np.count_nonzero(windows == tokens.N, axis=1) - (L - real)
    n_frac = n_count / real
    short = real < cfg.min_tail
    too_many_n = ~short & (n_frac > cfg.max_n_fraction)
    keep = ~short & ~too_many_n
    stats["windows_candidate"] = int(len(windows))
    stats["windows_kept"] = int(keep.sum())
    stats["dropped"] = {"n_fraction": int(too_many_n.sum()), "short_tail": int(short.sum())}
    stats["n_fraction_hist"] = np.histogram(n_frac, bins=N_HIST_BINS, range=(0.0, 1.0))[0].tolist()

    kept = np.ascontiguousarray(windows[keep])
    stats["gc_bases"] = int(np.count_nonzero((kept == tokens.C) | (kept == tokens.G)))
    stats["acgt_bases"] = int(np.count_nonzero(kept < tokens.N))
    k_starts, k_ends = starts[keep], np.minimum(ends[keep], own_end)
    # Union of the kept windows inside this piece's own range (windows overlap when stride < L).
    nxt = np.append(k_starts[1:], np.iinfo(np.int64).max)
    stats["bp_covered"] = int(np.maximum(0, np.minimum(k_ends, nxt) - k_starts).sum())

    meta = np.empty(len(kept), META_DTYPE)
    meta["start"], meta["end"], meta["region"] = k_starts, ends[keep], piece.region
    return kept, meta, stats


_CTX: tuple[tuple[Region, ...], ShardConfig, Path] | None = None


def init_extractor(regions: tuple[Region, ...], cfg: ShardConfig, work: Path) -> None:
    global _CTX
    _CTX = (regions, cfg, work)


def run_task(task: Task) -> dict:
    """Extract one task (after ``init_extractor``): spill files, then the marker; returns the marker."""
    regions, cfg, work = _CTX
    fasta = Fasta(cfg.fasta)
    stats = {"total": empty_stats(), "by_split": {}}
    by_split: dict[str, tuple[list, list]] = {}
    for piece in task.pieces:
        region = regions[piece.region]
        ids, meta, piece_stats = window_piece(fasta, region, piece, cfg)
        add_stats(stats["total"], piece_stats)
        add_stats(stats["by_split"].setdefault(region.split, empty_stats()), piece_stats)
        seqs, metas = by_split.setdefault(region.split, ([], []))
        seqs.append(ids)
        metas.append(meta)
    counts = {}
    for split, (seqs, metas) in sorted(by_split.items()):
        seq_path, meta_path = spill_paths(work, task.index, split)
        ids, meta = np.concatenate(seqs), np.concatenate(metas)
        write_atomic(seq_path, ids.tobytes())
        write_atomic(meta_path, _npy_bytes(meta))
        counts[split] = int(len(ids))
    marker = {"task": task.index, "contig": task.contig, "counts": counts, "stats": stats}
    write_atomic(task_marker(work, task.index), json.dumps(marker, sort_keys=True).encode())
    return marker


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
