"""Orchestration: ``build_shards`` (one machine) = ``extract_part`` over all tasks + ``merge``.

On Slurm, array task ``i`` of ``n`` runs ``extract_part(cfg, out, i, n)`` (tasks ``t`` with ``t % n == i``)
and one final job runs ``merge(out)``, which permutes across all parts and writes every shard (see
``sharding.write``). State lives in ``OUT/.work/``: ``build.json`` (what is being built), one spill + marker
per extraction task, one record per written shard. ``manifest.json`` is written last, then ``.work`` removed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from crossdna.config import from_dict, to_dict
from sharding import FORMAT_VERSION, SHARDER_VERSION
from crossdna.fileio import TMP_SUFFIX, sha256_file, write_atomic
from sharding.config import ShardConfig
from sharding.extract import (N_HIST_BINS, add_stats, empty_stats, init_extractor, run_task, spill_paths,
                              task_marker)
from sharding.fasta import Fasta
from sharding.manifest import MANIFEST, dumps, load_manifest
from sharding.regions import Plan, Task, make_plan, piece_range
from sharding.workers import Workers
from sharding.write import init_writer, shard_jobs, write_shard

WORK = ".work"
BUILD = "build.json"


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def _identity(cfg: ShardConfig) -> dict:
    """What the output is a function of: parameters, input checksums, sharder version (no paths, no time)."""
    fasta = Fasta(cfg.fasta)
    bed = None
    if cfg.bed is not None:
        bed = {"name": Path(cfg.bed).name, "sha256": _sha256_input(Path(cfg.bed), "BED")}
    return {
        "format_version": FORMAT_VERSION,
        "sharder_version": SHARDER_VERSION,
        "params": cfg.identity(),
        "source": {"fasta": fasta.path.name, "sha256": _sha256_input(fasta.path, "FASTA"),
                   "compression": "bgzf" if fasta.bgzf else "none", "contigs": fasta.lengths},
        "bed": bed,
    }


def _sha256_input(path: Path, what: str) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot read {what}: {e.strerror}") from None


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _clear(out: Path) -> None:
    """--overwrite: remove what a sharder run writes, and nothing else."""
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / WORK, ignore_errors=True)
    for shard in out.glob("*/shard-*.tar"):
        shard.unlink()


def _prepare(cfg: ShardConfig, out: Path, overwrite: bool) -> bool:
    """Check OUT against this build and record the build in ``.work``; returns whether it is already complete."""
    identity = _identity(cfg)
    manifest_file, build_file = out / MANIFEST, out / WORK / BUILD
    previous = None
    if manifest_file.exists():
        manifest = load_manifest(manifest_file)
        previous = {k: manifest[k] for k in identity}
    elif build_file.exists():
        previous = json.loads(build_file.read_text())["identity"]
    elif out.exists() and any(p.name != WORK for p in out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: not empty and not a shard directory; pass --overwrite to replace "
                             f"its shards, or choose an empty directory")
    if previous is not None and previous != identity:
        if not overwrite:
            diffs = "; ".join(_differences(previous, identity)[:4])
            raise ValueError(f"{out}: holds shards built with other parameters or inputs ({diffs}); "
                             f"pass --overwrite to replace them")
        previous = None
    if overwrite and previous is None:
        _clear(out)
    if previous is not None and manifest_file.exists():
        shutil.rmtree(out / WORK, ignore_errors=True)  # a run killed after its manifest was written
        return True
    (out / WORK / "shards").mkdir(parents=True, exist_ok=True)
    if not build_file.exists():
        info = {"identity": identity, "config": to_dict(cfg)}
        write_atomic(build_file, json.dumps(info, indent=1, sort_keys=True).encode())
    return False


def extract_part(cfg: ShardConfig, out_dir: str | Path, part: int = 0, num_parts: int = 1,
                 workers: int | None = None, overwrite: bool = False, progress: bool = True) -> int:
    """Extract the windows of tasks ``t % num_parts == part`` into ``OUT/.work``; returns tasks run now."""
    with Workers(workers or default_workers()) as pool:
        return len(_extract(cfg, Path(out_dir), part, num_parts, pool, overwrite, progress))


def _extract(cfg: ShardConfig, out: Path, part: int, num_parts: int, pool: Workers, overwrite: bool,
             progress: bool) -> set[int]:
    """The tasks extracted now (their spills are on disk, in this process's view, when it returns)."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part: {part} is not in [0, {num_parts})")
    if _prepare(cfg, out, overwrite):
        return set()
    plan = make_plan(cfg, Fasta(cfg.fasta).lengths)
    work = out / WORK
    pending = [t for t in plan.tasks[part::num_parts] if not task_marker(work, t.index).exists()]
    total_bp = sum(_task_bp(plan, t, cfg) for t in pending)
    with tqdm(total=total_bp, unit="bp", unit_scale=True, desc=f"extract part {part}/{num_parts}",
              disable=not progress) as bar:
        for marker in pool.map(run_task, pending, init_extractor, (plan.regions, cfg, work)):
            bar.update(marker["stats"]["total"]["bp_input"])
    return {t.index for t in pending}


def _task_bp(plan: Plan, task: Task, cfg: ShardConfig) -> int:
    ranges = (piece_range(plan.regions[p.region], p, cfg) for p in task.pieces)
    return sum(end - start for start, end in ranges)


def _derived(stats: dict) -> dict:
    return {**stats,
            "gc_content": stats["gc_bases"] / stats["acgt_bases"] if stats["acgt_bases"] else None,
            "coverage": stats["bp_covered"] / stats["bp_input"] if stats["bp_input"] else None}


def _summarise(plan: Plan, markers: list[dict], samples: dict[str, int]) -> dict:
    total, by_split = empty_stats(), {}
    for marker in markers:
        add_stats(total, marker["stats"]["total"])
        for split, st in marker["stats"]["by_split"].items():
            add_stats(by_split.setdefault(split, empty_stats()), st)
    stats = _derived(total)
    stats["n_fraction_hist_edges"] = [i / N_HIST_BINS for i in range(N_HIST_BINS + 1)]
    stats["by_split"] = {s: {"samples": samples.get(s, 0), **_derived(st)} for s, st in sorted(by_split.items())}
    stats["regions"] = len(plan.regions)
    stats["cross_split_overlap_bp"] = plan.cross_split_overlap_bp
    if plan.bed_rows:
        stats["bed_rows"], stats["bed_bp"] = plan.bed_rows, plan.bed_bp
    return stats


def merge(out_dir: str | Path, workers: int | None = None, progress: bool = True) -> Path:
    """Permute the extracted windows of every split and write all shards + ``manifest.json``."""
    with Workers(workers or default_workers()) as pool:
        return _merge(Path(out_dir), pool, progress, extracted=set())


def _merge(out: Path, pool: Workers, progress: bool, extracted: set[int]) -> Path:
    """``extracted``: tasks whose spills this process wrote (no crash since: their CRC-32 check is skipped)."""
    work, manifest_file = out / WORK, out / MANIFEST
    if manifest_file.exists() and not (work / BUILD).exists():
        return manifest_file
    if not (work / BUILD).exists():
        raise ValueError(f"{out}: nothing to merge ({WORK}/{BUILD} missing); run `crossdna shard extract` first")
    # Temp files of writers that were killed (SIGKILL, node loss): only the merge writes shards, and it runs
    # once, after every extract part finished, so nothing else can own them now.
    for stale in [*out.glob(f"*/.shard-*.tar{TMP_SUFFIX}*"), *work.rglob(f".*{TMP_SUFFIX}*")]:
        stale.unlink()
    info = json.loads((work / BUILD).read_text())
    cfg = from_dict(ShardConfig, info["config"])
    plan = make_plan(cfg, info["identity"]["source"]["contigs"])
    missing = [t for t in plan.tasks if not task_marker(work, t.index).exists()]
    if missing:
        shown = ", ".join(f"{t.index} ({t.contig})" for t in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{out}: {len(missing)} of {len(plan.tasks)} extraction tasks not done: {shown}; "
                         f"rerun their `crossdna shard extract` parts (part = task % num_parts), then merge")
    markers = [json.loads(task_marker(work, t.index).read_text()) for t in plan.tasks]
    sources: dict[str, list[tuple[int, int]]] = {}
    for marker in markers:
        for split, count in marker["counts"].items():
            seq_path, _ = spill_paths(work, marker["task"], split)
            if seq_path.stat().st_size != count * cfg.window_length:
                raise ValueError(f"{seq_path}: size does not match its marker (delete "
                                 f"{task_marker(work, marker['task']).name} to redo the task)")
            if count:
                sources.setdefault(split, []).append((marker["task"], count))
    samples = {split: sum(c for _, c in src) for split, src in sources.items()}
    if not samples:
        st = _summarise(plan, markers, samples)
        raise ValueError(f"{cfg.fasta}: no windows produced: {st['windows_candidate']} candidate windows, "
                         f"dropped {st['dropped']}; check max_n_fraction, min_tail, window_length")
    jobs = [job for split in sorted(sources)
            for job in shard_jobs(split, tuple(sources[split]), cfg.samples_per_shard, cfg.seed)]
    for split in sources:
        (out / split).mkdir(exist_ok=True)
    records = {}
    # Markers from before the spills went unsynced (sharder 1.0.0 without "crc32") need no check.
    crc32 = {(m["task"], split): tuple(c) for m in markers if m["task"] not in extracted
             for split, c in m.get("crc32", {}).items()}
    init_args = (out, work, plan.regions, cfg.window_length, crc32)
    with tqdm(total=len(jobs), unit="shard", desc="write shards", disable=not progress) as bar:
        for record in pool.map(write_shard, jobs, init_writer, init_args):
            records[record["path"]] = record
            bar.update(1)
    pool.finish()
    identity = info["identity"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "sharder_version": SHARDER_VERSION,
        "window_length": cfg.window_length,
        "samples_per_shard": cfg.samples_per_shard,
        "source": identity["source"],
        "bed": identity["bed"],
        "params": identity["params"],
        "splits": {split: {"samples": samples[split],
                           "shards": [records[path] for path in sorted(records) if path.startswith(f"{split}/")]}
                   for split in sorted(samples)},
        "stats": _summarise(plan, markers, samples),
    }
    write_atomic(manifest_file, dumps(manifest))
    shutil.rmtree(work)
    return manifest_file


def build_shards(cfg: ShardConfig, out_dir: str | Path, workers: int | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Shard ``cfg.fasta`` into ``out_dir`` on this machine; returns the manifest path. Resumes a killed run."""
    with Workers(workers or default_workers()) as pool:  # one pool for both phases
        extracted = _extract(cfg, Path(out_dir), 0, 1, pool, overwrite, progress)
        return _merge(Path(out_dir), pool, progress, extracted)
