"""A real 2-process training loop that uses the tracker exactly as the trainer does (tests only).

Started by ``torchrun --nproc_per_node=2`` from tests/test_tracking_server.py. Each rank trains a tiny
next-base predictor with DDP (gloo) on real Genomic Benchmarks sequences and logs real loss, accuracy, grad
norm, throughput, data-wait and cross-rank step-time spread through ``launcher.tracking.Tracker``. It saves a
"checkpoint" (``trainer.json`` with the run id, as launcher/checkpoint.py does) and can resume from it, pause
at a step so a test can kill the tracking server, and export the final weights as safetensors.
Once launcher/train.py exists, the same tests run against the full trainer as well.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from crossdna.config import config_hash, to_dict
from crossdna.tokens import encode
from launcher.stragglers import step_time_spread
from launcher.tracking import Tracker, TrackingConfig

CONTEXT = 8  # bases of left context per prediction
WINDOW = 96  # bases per sample


class NextBase(torch.nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, dim)
        self.mix = torch.nn.Linear(CONTEXT * dim, dim)
        self.head = torch.nn.Linear(dim, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B, W] -> logits [B, W-CONTEXT, 5]
        ctx = ids.unfold(1, CONTEXT, 1)[:, :-1]  # [B, W-CONTEXT, CONTEXT]
        h = self.embed(ctx).flatten(2)
        return self.head(torch.tanh(self.mix(h)))


def load_windows(tsv: Path, rank: int, world: int) -> torch.Tensor:
    rows = [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]]
    seqs = [encode(r.encode()) for r in rows if len(r) >= WINDOW]
    windows = torch.stack([torch.as_tensor(s[:WINDOW], dtype=torch.long) for s in seqs])
    return windows[rank::world]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True, help="train until this global step (exclusive)")
    ap.add_argument("--resume", action="store_true", help="continue from run-dir/trainer.json")
    ap.add_argument("--exit-status", default="FINISHED", help="run status at close (KILLED = preempted)")
    ap.add_argument("--pause-at", type=int, default=-1, help="after logging this step, write run-dir/paused "
                                                             "and wait for run-dir/go")
    ap.add_argument("--export", action="store_true", help="log the final weights as a safetensors artifact")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    state_file = args.run_dir / "trainer.json"
    state = json.loads(state_file.read_text()) if args.resume else {"step": 0, "run_id": None}

    model = NextBase()
    if args.resume:
        model.load_state_dict(torch.load(args.run_dir / "model.pt", weights_only=True))
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    windows = load_windows(args.data, rank, world)

    tracking = TrackingConfig(experiment="driver", flush_interval_s=0.2, close_timeout_s=5.0,
                              telemetry_interval_s=0.5)
    config = {"model": {"dim": 32, "context": CONTEXT, "window": WINDOW}, "optim": {"lr": 1e-3},
              "tracking": to_dict(tracking), "secrets": {"api_token": os.environ.get("DRIVER_SECRET", "")}}
    manifest_hash = "gb-regulatory-subsample"
    tracker = Tracker.create(tracking, args.run_dir, rank=rank, world_size=world, resume_run_id=state["run_id"],
                             config=config, tags={"config_hash": config_hash(config), "strategy": "ddp",
                                                  "data.manifest_hash": manifest_hash})
    batch = 16
    step = state["step"]
    while step < args.steps:
        t0 = time.perf_counter()
        start = (step * batch) % (len(windows) - batch)
        ids = windows[start:start + batch]
        t_data = time.perf_counter() - t0
        logits = ddp(ids)
        target = ids[:, CONTEXT:]
        loss = F.cross_entropy(logits.reshape(-1, 5), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        acc = (logits.argmax(-1) == target).float().mean()
        dt = time.perf_counter() - t0
        tracker.log_metrics(step, {
            "train/loss": loss.detach(), "train/loss_ce": loss.detach(), "train/acc": acc,
            "train/grad_norm": grad_norm, "train/lr": opt.param_groups[0]["lr"],
            "perf/tokens_per_s": world * target.numel() / dt, "perf/samples_per_s": world * batch / dt,
            "perf/data_wait_s": t_data, **step_time_spread(dt),
        })
        if step == args.pause_at:
            tracker.flush(10.0)
            if rank == 0:
                (args.run_dir / "paused").write_text(str(step))
            while not (args.run_dir / "go").exists():
                time.sleep(0.05)
        step += 1
        time.sleep(0.05)  # a step of a real model takes longer; lets the worker send between steps

    if rank == 0:
        torch.save(model.state_dict(), args.run_dir / "model.pt")
        state_file.write_text(json.dumps({"step": step, "run_id": tracker.run_id}))
        tracker.log_checkpoint(step, args.run_dir / "model.pt", manifest_hash)
        if args.export:
            export = args.run_dir / "export"
            export.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors")
            tracker.log_artifact(export / "model.safetensors", "model")
    with torch.no_grad():
        ids = windows[:batch]
        eval_loss = F.cross_entropy(model(ids).reshape(-1, 5), ids[:, CONTEXT:].reshape(-1))
    tracker.log_metrics(step, {"eval/loss": eval_loss})
    tracker.close(args.exit_status)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
