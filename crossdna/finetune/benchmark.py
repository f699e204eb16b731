"""Run a suite: every task × every seed, aggregate mean ± std, write results.md / results.json, track in MLflow.

Each task is one MLflow child run under the suite's parent run; its seeds log under ``seed<k>/`` and the child
also gets ``test/<metric>_mean`` / ``_std``. The result files are written atomically after every task, so an
interrupted suite keeps the tasks it finished.
"""
from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from crossdna import __version__
from crossdna import config as _config
from crossdna.fileio import write_atomic
from crossdna.finetune.config import BenchmarkConfig, TaskConfig
from crossdna.finetune.data import load_splits
from crossdna.finetune.metrics import METRICS
from crossdna.finetune.tracking import BenchmarkTracker
from crossdna.finetune.trainer import FinetuneResult, finetune, resolve_device, seed_everything
from crossdna.hf.weights import load_backbone
from launcher.run_tags import git_state



def summarize(results: Sequence[FinetuneResult], kind: str) -> dict[str, dict[str, float]]:
    """Per test metric: mean, sample std (ddof=1; 0 for one seed), and n."""
    out = {}
    for name in (*METRICS[kind], "loss"):
        values = np.array([r.test[name] for r in results if name in r.test], dtype=np.float64)
        if len(values):
            out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                         "n": int(len(values))}
    return out


def results_markdown(suite: str, init: str, rows: list[dict]) -> str:
    def cell(stats: dict | None) -> str:
        if stats is None or math.isnan(stats["mean"]):
            return "–"
        return f"{stats['mean']:.4f} ± {stats['std']:.4f}"

    metric_names = []
    for row in rows:
        metric_names += [m for m in METRICS[row["kind"]] if m not in metric_names]
    lines = [f"# {suite}: test metrics (mean ± std over seeds)", "",
             f"init: `{init}`. Model selection on the validation split by the task's metric (marked *); "
             "metrics over the whole test set.", "",
             "| task | seeds | " + " | ".join(metric_names) + " |",
             "|---|---:|" + "---:|" * len(metric_names)]
    for row in rows:
        cells = []
        for m in metric_names:
            text = cell(row["test"].get(m))
            cells.append(f"**{text}**\\*" if m == row["metric"] else text)
        lines.append(f"| {row['task']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class BenchmarkOutput:
    rows: list[dict]
    json_path: Path
    markdown_path: Path
    parent_run_id: str | None


def run_benchmark(cfg: BenchmarkConfig, init: str, out_dir: str | Path, task_names: Sequence[str] | None = None,
                  seeds: Sequence[int] | None = None, tracking: bool = True, progress: bool = True) -> BenchmarkOutput:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: list[TaskConfig] = [cfg.task(n) for n in task_names] if task_names else list(cfg.tasks)
    seeds = list(seeds) if seeds else list(cfg.seeds)
    device = resolve_device(cfg.train.device)
    git_sha, git_dirty = git_state()
    meta = {"suite": cfg.name, "init": init, "seeds": seeds, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "crossdna": __version__, "git_sha": git_sha, "git_dirty": git_dirty,
            "config": _config.to_dict(cfg)}
    tracker = BenchmarkTracker(out_dir, cfg.experiment, f"{cfg.name}:{Path(init).name}", cfg.tracking_uri,
                               enabled=tracking, tags={"crossdna.suite": cfg.name, "crossdna.init": init})
    if tracker.parent is not None:
        tracker.parent.log_params({"suite": cfg.name, "init": init, "seeds": seeds,
                                   "train": _config.to_dict(cfg.train)})
    rows: list[dict] = []
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    status = "FAILED"
    try:
        for task in tasks:
            splits = load_splits(cfg, task)  # read once; every seed sees the same train/val/test rows
            child = tracker.child(task.name, tags={"crossdna.task": task.name})
            if child is not None:
                child.log_params({"task": _config.to_dict(task), "num_outputs": splits.num_outputs,
                                  "train_samples": len(splits.train), "val_samples": len(splits.val),
                                  "test_samples": len(splits.test)})
            results = []
            try:
                for seed in seeds:
                    seed_everything(seed)  # the backbone (from scratch) and the head are initialised from the seed
                    backbone, source = load_backbone(init, cfg.model_preset, cfg.train.model_overrides)
                    log = (lambda step, m, _s=seed: child.log_metrics(step, m, prefix=f"seed{_s}/")) if child else None
                    results.append(finetune(task, cfg.train, splits, backbone, backbone.cfg.d_model, seed, log,
                                            progress))
            except BaseException:
                if child is not None:
                    child.finish("FAILED")
                raise
            summary = summarize(results, task.kind)
            row = {"task": task.name, "kind": task.kind, "metric": task.metric, "seeds": seeds, "source": source,
                   "test": summary, "runs": [r.to_dict() for r in results]}
            rows.append(row)
            if child is not None:
                child.log_metrics(0, {f"test/{k}_{s}": v[s] for k, v in summary.items() for s in ("mean", "std")})
                child.finish()
            write_atomic(json_path, (json.dumps({**meta, "tasks": rows}, indent=2, default=float) + "\n").encode())
            write_atomic(md_path, results_markdown(cfg.name, init, rows).encode())
        status = "FINISHED"
    finally:
        if tracker.parent is not None:
            if rows:
                tracker.parent.log_artifact(json_path)
                tracker.parent.log_artifact(md_path)
            tracker.parent.finish(status)
    return BenchmarkOutput(rows, json_path, md_path, tracker.parent.run_id if tracker.parent else None)
