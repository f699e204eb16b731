"""Where a training step's peak GPU memory goes: records the CUDA allocator's history over one uncaptured step of
``crossdna bench train-step``'s configuration and reports, at the moment of the peak, the live allocations grouped
by the code that made them (the innermost frame in this project, and the innermost frame of all), with what was
being allocated at that moment. Writes ``memory_peak_<device>[_TAG].json`` to OUT_DIR.

    python benchmarks/memory_peak.py OUT_DIR --fasta chr20.fa.gz [--batch 150] [--budget 1.0] [--tag NAME]
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch

from crossdna.bench.train_step import STEP, BenchConfig, build, make_step, real_batches
from crossdna.objectives import ObjectiveConfig
from launcher.run_tags import git_state

OURS = ("/crossdna/", "/launcher/")


def _short(filename: str) -> str:
    for root in ("/site-packages/", *OURS):
        if root in filename:
            return filename[filename.rindex(root) + (len(root) if root == "/site-packages/" else 1):]
    return filename


def _site(frames: list[dict], match=lambda name: True) -> str:
    """The innermost frame (frames run innermost first) whose file ``match``es, as file:line function."""
    for f in frames:
        if match(f["filename"]):
            return f"{_short(f['filename'])}:{f['line']} {f['name']}"
    return "?"


def peak_breakdown(trace: list[dict], top: int = 30) -> dict:
    """Replay the allocator's events: the largest live total, and the live blocks at that event by site."""
    live, total, best, best_at = {}, 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > best:
                best, best_at = total, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])
    blocks = {}
    for e in trace[:best_at + 1]:
        if e["action"] == "alloc":
            blocks[e["addr"]] = e
        elif e["action"] == "free_completed":
            blocks.pop(e["addr"], None)
    groups = {"ours": collections.Counter(), "innermost": collections.Counter()}
    for e in blocks.values():
        groups["ours"][_site(e["frames"], lambda name: any(o in name for o in OURS))] += e["size"]
        groups["innermost"][_site(e["frames"])] += e["size"]
    at_peak = trace[best_at]
    return {"peak_gib": best / 2 ** 30, "live_blocks": len(blocks),
            "allocating_at_peak": [_site([f]) for f in at_peak["frames"][:12]],
            **{f"by_{name}": [{"site": s, "gib": b / 2 ** 30} for s, b in c.most_common(top)]
               for name, c in groups.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--fasta", required=True)
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--budget", type=float, default=1.0, help="activation_budget of the compiled layers")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    device = torch.device("cuda")
    cfg = BenchConfig(fasta=args.fasta, batch_sizes=(args.batch,), compile=True, comba_precision="autocast",
                      overlap_teacher=True, activation_budget=args.budget)
    model, optimizer = build(cfg, device)
    step = make_step(model, optimizer, cfg.amp, ObjectiveConfig(gram=cfg.gram), STEP, compiled=True)
    batches = [{k: v.to(device) for k, v in b.items()} for b in real_batches(args.fasta, args.batch, cfg.length, 2, 0)]
    for i in range(3):  # compile, autotune, settle the caching allocator
        step(batches[i % 2])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    step(batches[0])
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    report = {"benchmark": "memory_peak", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
              "activation_budget": args.budget,
              "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
              **peak_breakdown(snapshot["device_traces"][device.index or 0])}
    report["git_sha"], report["git_dirty"] = git_state()
    name = torch.cuda.get_device_name().split()[1].lower()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"memory_peak_{name}{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(report, indent=1))
    print(f"peak {report['peak_gib']:.2f} GiB (max_memory_allocated {report['max_memory_allocated_gib']:.2f}); "
          f"allocating at the peak: {report['allocating_at_peak'][:4]}")
    for row in report["by_ours"][:20]:
        print(f"{row['gib']:7.3f} GiB  {row['site']}")


if __name__ == "__main__":
    main()
