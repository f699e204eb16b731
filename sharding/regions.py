"""What to window: regions (contig, start, end, split) from a BED or a whole-contig split spec, and the plan
that cuts them into extraction tasks.

The plan is a pure function of the config and the FASTA index, so every Slurm array task and the merge step
compute the same one, and the global window order (contig order of the FASTA, then region start, then window
index) does not depend on how many workers or parts run it.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

from sharding.config import ShardConfig

TASK_BP = 8_000_000         # bases per extraction task: the unit of parallelism, resume and memory (~6x this)
BASENJI_LABELS = ("train", "valid", "test")


@dataclass(frozen=True)
class Region:
    contig: str
    start: int
    end: int
    split: str
    interval: tuple[str, int, int] | None  # the (merged) BED interval it came from; None in whole-contig mode

    def n_windows(self, length: int, stride: int) -> tuple[int, bool]:
        """(full windows, whether a tail window follows) on the grid start + k * stride."""
        size = self.end - self.start
        full = (size - length) // stride + 1 if size >= length else 0
        covered_to = self.start + (full - 1) * stride + length if full else self.start
        tail_start = self.start + full * stride
        return full, covered_to < self.end and tail_start < self.end


@dataclass(frozen=True)
class Piece:
    region: int  # index into the plan's regions
    k0: int      # first window index (on the region's grid)
    k1: int      # one past the last


def piece_range(region: Region, piece: Piece, cfg: ShardConfig) -> tuple[int, int]:
    """The bases a piece owns: its windows' grid cells, through the region end for the region's last piece.
    The pieces of a region partition it, so per-piece input counts add up exactly."""
    full, tail = region.n_windows(cfg.window_length, cfg.stride)
    start = region.start + piece.k0 * cfg.stride
    end = region.end if piece.k1 == full + tail else min(region.end, region.start + piece.k1 * cfg.stride)
    return start, end


@dataclass(frozen=True)
class Task:
    index: int
    contig: str
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Plan:
    regions: tuple[Region, ...]
    tasks: tuple[Task, ...]
    bed_rows: int
    bed_bp: int  # sum of BED interval lengths before merging overlaps
    cross_split_overlap_bp: int  # bases in regions of two splits: windows there leak between the splits


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gz else open(path)


def read_bed(path: str | Path, lengths: dict[str, int], labels: dict[str, str]) -> list[Region]:
    """BED rows ``chrom start end label`` -> regions, with one-line errors naming file and line."""
    path = Path(path)
    allowed = labels or {name: name for name in BASENJI_LABELS}
    regions = []
    try:
        handle = _open_text(path)
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot read BED: {e.strerror}") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            where = f"{path}:{lineno}"
            fields = line.split()
            if len(fields) < 4:
                raise ValueError(f"{where}: expected 4 columns (chrom start end split), got {len(fields)}")
            chrom, start_s, end_s, label = fields[:4]
            try:
                start, end = int(start_s), int(end_s)
            except ValueError:
                raise ValueError(f"{where}: start/end must be integers, got {start_s!r} {end_s!r}") from None
            if start < 0 or end < 0:
                raise ValueError(f"{where}: negative coordinate {start}-{end}")
            if start >= end:
                raise ValueError(f"{where}: start {start} >= end {end}")
            if chrom not in lengths:
                shown = ", ".join(list(lengths)[:5]) + (", ..." if len(lengths) > 5 else "")
                raise ValueError(f"{where}: unknown contig {chrom!r} (the FASTA has {shown})")
            if end > lengths[chrom]:
                raise ValueError(f"{where}: interval {chrom}:{start}-{end} ends past the contig "
                                 f"(length {lengths[chrom]})")
            if label not in allowed:
                hint = "map it with split_labels" if not labels else f"split_labels knows {sorted(labels)}"
                raise ValueError(f"{where}: unknown split label {label!r} ({hint})")
            regions.append(Region(chrom, start, end, allowed[label], (chrom, start, end)))
    return regions


def merge_overlaps(regions: list[Region]) -> list[Region]:
    """Merge overlapping or touching regions of the same split and contig (Basenji/Borzoi rows overlap ~4x)."""
    merged: list[Region] = []
    for r in sorted(regions, key=lambda r: (r.split, r.contig, r.start, r.end)):
        last = merged[-1] if merged else None
        if last is not None and (last.split, last.contig) == (r.split, r.contig) and r.start <= last.end:
            end = max(last.end, r.end)
            merged[-1] = Region(r.contig, last.start, end, r.split, (r.contig, last.start, end))
        else:
            merged.append(r)
    return merged


def contig_regions(cfg: ShardConfig, lengths: dict[str, int]) -> list[Region]:
    split_of = {contig: split for split, contigs in cfg.splits.items() for contig in contigs}
    for contig, split in split_of.items():
        if contig not in lengths:
            raise ValueError(f"splits.{split}: contig {contig!r} is not in the FASTA")
    pattern = re.compile(cfg.contig_pattern)
    return [Region(name, 0, length, split_of.get(name, cfg.default_split), None)
            for name, length in lengths.items()
            if length > 0 and (name in split_of or pattern.fullmatch(name))]


def make_plan(cfg: ShardConfig, lengths: dict[str, int]) -> Plan:
    if cfg.bed is not None:
        rows = read_bed(cfg.bed, lengths, cfg.split_labels)
        bed_rows, bed_bp = len(rows), sum(r.end - r.start for r in rows)
        regions = merge_overlaps(rows) if cfg.merge_overlaps else rows
    else:
        regions, bed_rows, bed_bp = contig_regions(cfg, lengths), 0, 0
    order = {name: i for i, name in enumerate(lengths)}
    regions = sorted(regions, key=lambda r: (order[r.contig], r.start, r.end, r.split))
    return Plan(tuple(regions), _cut_tasks(regions, cfg), bed_rows, bed_bp, _cross_split_overlap(regions))


def _cross_split_overlap(regions: list[Region]) -> int:
    """Bases shared by regions of different splits (regions sorted by contig and start)."""
    shared = 0
    for i, a in enumerate(regions):
        for b in regions[i + 1:]:
            if b.contig != a.contig or b.start >= a.end:
                break
            if b.split != a.split:
                shared += min(a.end, b.end) - b.start
    return shared


def _cut_tasks(regions: list[Region], cfg: ShardConfig) -> tuple[Task, ...]:
    """Greedy: consecutive pieces of one contig until a task holds about TASK_BP bases of windows."""
    budget = max(1, TASK_BP // cfg.stride)
    tasks: list[Task] = []
    pieces: list[Piece] = []
    used, contig = 0, None

    def flush() -> None:
        nonlocal pieces, used
        if pieces:
            tasks.append(Task(len(tasks), contig, tuple(pieces)))
        pieces, used = [], 0

    for i, region in enumerate(regions):
        if region.contig != contig:
            flush()
            contig = region.contig
        full, tail = region.n_windows(cfg.window_length, cfg.stride)
        total, k = full + tail, 0
        while k < total:
            take = min(total - k, budget - used)
            pieces.append(Piece(i, k, k + take))
            k, used = k + take, used + take
            if used >= budget:
                flush()
    flush()
    return tuple(tasks)
