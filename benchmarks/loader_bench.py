"""Loader throughput: samples/s of one worker process at L=1024 with MLM masking, against the upstream way.

What is timed
* ``loader``: the exact code a DataLoader worker runs (``_TrainBatches``: order -> shard read + sha256 on first
  open -> gather -> masking -> int64 tensors) in this process, for whole epochs of real chr20 shards, with every
  shard re-opened each epoch (``shuffle_block_shards=1``: a 2-shard cache for 5 shards). Reported at
  world size 1 and as rank 0 of world size 8 (the worker opens every shard of the epoch but keeps 1/8 of its
  samples: the cost of a topology-independent order; after the first epoch it touches only those samples' pages).
* ``dataloader``: ``PretrainStream`` end to end with ``num_workers`` processes (main-process rate).
* ``upstream``: the HyenaDNA-family way (``FastaInterval`` + ``CharacterTokenizer`` + ``bert_mask``): a pyfaidx
  fetch per sample, per-character tokenisation, the id-7 mapping and torch masking per sample, then collation.
  It is a lower bound on upstream's cost: a dict lookup per character instead of the HF tokenizer call, and
  ``bert_mask`` once instead of twice.

Usage: ``python benchmarks/loader_bench.py [--shards DIR] [--out benchmarks/results/loader_cpu.json]``.
Without ``--shards`` it shards 20 Mbp of GRCh37 chr20 (../shared/data) into a temporary directory first.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from crossdna.data import DataConfig, PretrainStream
from crossdna.data.order import GlobalSchedule, RankSlicer
from crossdna.data import shards as shard_module
from crossdna.data.shards import SplitShards
from crossdna.data.stream import _TrainBatches

REPO = Path(__file__).resolve().parents[1]
CHR20 = REPO.parent / "shared" / "data" / "human_chr20_grch37" / "20.fa.gz"
REGION = ("20", 30_000_000, 50_000_000)  # 20 Mbp without assembly gaps: ~19.5k windows of 1024


def build_shards(out: Path) -> Path:
    from sharding.build import build_shards as build
    from sharding.config import ShardConfig

    bed = out / "region.bed"
    bed.write_text("{}\t{}\t{}\ttrain\n".format(*REGION))
    cfg = ShardConfig(fasta=str(CHR20), bed=str(bed), window_length=1024, samples_per_shard=4096, seed=0)
    return build(cfg, out / "shards", workers=os.cpu_count())


def time_loader(shards: Path, world: int, micro: int, epochs: int) -> dict:
    split = SplitShards.open(shards, "train")
    # One-shard blocks keep 2 shards mapped, fewer than the split has: every epoch re-opens every shard, as on a
    # real corpus whose shards far outnumber the cache.
    cfg = DataConfig(num_workers=0, shuffle_block_shards=1)
    slicer = RankSlicer(world, 0, micro, 1)
    schedule = GlobalSchedule(split.num_samples, slicer.global_batch, cfg.tail)
    steps = epochs * schedule.steps_per_epoch
    shard_module._VERIFIED.clear()  # the first epoch pays sha256 and tar indexing, as a fresh worker does
    shard_module._LAYOUTS.clear()
    batches = iter(_TrainBatches(split, cfg, schedule, slicer, 0))
    start = time.perf_counter()
    first_epoch = None
    for step in range(steps):
        next(batches)
        if step + 1 == schedule.steps_per_epoch:
            first_epoch = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    per_epoch = schedule.steps_per_epoch * micro
    return {"world_size": world, "micro_batch": micro, "samples": steps * micro, "seconds": round(elapsed, 3),
            "samples_per_s": round(steps * micro / elapsed),
            "first_epoch_samples_per_s (sha256 verified)": round(per_epoch / first_epoch),
            "later_epochs_samples_per_s": round((steps * micro - per_epoch) / (elapsed - first_epoch))}


def time_dataloader(shards: Path, workers: int, micro: int, samples: int) -> dict:
    stream = PretrainStream(shards, "train", DataConfig(num_workers=workers), 0, 1, micro, 1)
    it = iter(stream)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(samples // micro):
        next(it)
    elapsed = time.perf_counter() - start
    return {"num_workers": workers, "micro_batch": micro, "samples": samples // micro * micro,
            "samples_per_s": round(samples // micro * micro / elapsed)}


# ---- the upstream way (HyenaDNA-family hg38 loader, spec §3.1 and §4.1) --------------------------------------
_VOCAB = {c: i for i, c in enumerate(["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]",
                                      "A", "C", "G", "T", "N"])}


def _bert_mask(seq: torch.Tensor, mask_id: int = 4, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.rand(seq.shape) < prob
    action = torch.rand(seq.shape)
    masked = seq.clone()
    masked[mask & (action < 0.8)] = mask_id
    random = mask & (action >= 0.8) & (action < 0.9)
    masked[random] = torch.randint(0, 4, seq.shape)[random]
    return masked, mask


def time_upstream(fasta_path: Path, coords: list[tuple[str, int, int]], micro: int) -> dict:
    import pyfaidx

    fasta = pyfaidx.Fasta(str(fasta_path))
    unk = _VOCAB["[UNK]"]
    start = time.perf_counter()
    for b in range(0, len(coords) - micro + 1, micro):
        rows = []
        for chrom, lo, hi in coords[b:b + micro]:
            seq = str(fasta[chrom][lo:hi])
            ids = torch.LongTensor([_VOCAB.get(c, unk) for c in seq]) - 7
            ids[(ids < 0) | (ids >= 4)] = 4
            masked, mask = _bert_mask(ids)
            rows.append((masked, ids, mask))
        torch.utils.data.default_collate(rows)
    elapsed = time.perf_counter() - start
    n = (len(coords) // micro) * micro
    return {"samples": n, "seconds": round(elapsed, 3), "samples_per_s": round(n / elapsed)}


def window_coords(shards: Path, limit: int) -> list[tuple[str, int, int]]:
    from webdataset import tariterators

    split = SplitShards.open(shards, "train")
    coords = []
    for path in split.paths:
        for member in tariterators.tar_file_iterator(io.BytesIO(path.read_bytes())):
            if member["fname"].endswith(".json"):
                meta = json.loads(member["data"])
                coords.append((meta["chrom"], meta["start"], meta["end"]))
                if len(coords) == limit:
                    return coords
    return coords


def git_sha() -> str:
    try:
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        return "uncommitted" if dirty.strip() else sha.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="shard directory with a train split (default: build one)")
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--upstream-samples", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loader_cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = args.shards or build_shards(tmp)
        loader = [time_loader(shards, world, args.micro_batch // world, args.epochs) for world in (1, 8)]
        dataloader = time_dataloader(shards, args.workers, args.micro_batch, 40 * args.micro_batch)
        fasta = tmp / "20.fa"
        with gzip.open(CHR20, "rb") as src, open(fasta, "wb") as dst:
            shutil.copyfileobj(src, dst)
        upstream = time_upstream(fasta, window_coords(shards, args.upstream_samples), args.micro_batch)
        split = SplitShards.open(shards, "train")

    per_worker = loader[0]["samples_per_s"]
    result = {
        "benchmark": "loader_bench",
        "git_sha": git_sha(),
        "device": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                   "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
                   "note": "other jobs share these cores: rates vary with the load (lower bounds)"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "webdataset": version("webdataset"), "pyfaidx": version("pyfaidx")},
        "data": {"fasta": "GRCh37 chr20 (20.fa.gz)", "region": "{}:{}-{}".format(*REGION),
                 "window_length": split.window_length, "samples": split.num_samples, "shards": len(split.paths),
                 "samples_per_shard": int(split.sizes[0])},
        "loader_per_worker": loader,
        "dataloader_end_to_end": dataloader,
        "upstream_per_worker": upstream,
        "speedup_vs_upstream": round(per_worker / upstream["samples_per_s"], 1),
        "targets": {"per_worker_samples_per_s": 10_000, "speedup_vs_upstream": 10,
                    "met": per_worker >= 10_000 and per_worker >= 10 * upstream["samples_per_s"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
