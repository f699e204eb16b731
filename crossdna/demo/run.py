"""The README's main job on an embedded default: shard the bundled chr20 slice, pretrain the tiny model on CPU with
a local MLflow store, render the run's plots, and export the result as a HuggingFace directory.

Every stage is the real one (``build_shards``, ``launcher.train``, ``render_report``, ``hf.export``) with the
configs in ``configs/shard/demo.yaml`` and ``configs/pretrain/demo.yaml``; the demo only chains them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
log = logging.getLogger("crossdna.demo")


@dataclass
class DemoResult:
    shards: Path
    run_dir: Path
    tracking_uri: str
    run_id: str
    plots: list[Path]
    weights: Path
    hf_dir: Path


def find_configs(start: Path | None = None) -> Path:
    """The ``configs/`` directory: next to the package in a checkout (or the Docker image), else under the cwd."""
    for base in (Path(__file__).resolve().parents[2], start or Path.cwd()):
        if (base / "configs" / "pretrain" / "demo.yaml").is_file():
            return base / "configs"
    raise FileNotFoundError("configs/pretrain/demo.yaml not found next to the package or in the current directory; "
                            "run the demo from the repository root")


def _stage(name: str, t0: float) -> None:
    log.info("demo: %s done in %.1f s", name, time.perf_counter() - t0)


def run_demo(out: str | Path, overrides: list[str] = (), overwrite: bool = False) -> DemoResult:
    from mlflow.tracking import MlflowClient

    from crossdna.config import load
    from crossdna.hf.export import export, parity_check
    from launcher.config import load_train_config
    from launcher.report_plots import render_report
    from launcher.tracking import resolve_tracking_uri
    from launcher.train import train
    from sharding.build import build_shards
    from sharding.config import ShardConfig

    out = Path(out).resolve()
    configs = find_configs()
    run_dir = out / "run"
    train_config = configs / "pretrain" / "demo.yaml"
    train_overrides = [f"data.path={out / 'shards'}", f"trainer.run_dir={run_dir}", *overrides]
    cfg = load_train_config(train_config, train_overrides)  # a bad override fails here, before any work
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    shard_cfg = load(ShardConfig, configs / "shard" / "demo.yaml",
                     [f"fasta={DATA / 'chr20_slices.fa.gz'}", f"bed={DATA / 'chr20_slices.folds.bed'}"])
    manifest = build_shards(shard_cfg, out / "shards", overwrite=overwrite)
    _stage("sharding", t0)

    t0 = time.perf_counter()
    code = train(str(train_config), train_overrides)
    if code != 0:
        raise RuntimeError(f"demo: training exited with code {code} (logs above; run dir {run_dir})")
    _stage("pretraining", t0)

    uri = resolve_tracking_uri(cfg.tracking, run_dir)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    run_id = runs[0].info.run_id
    plots = render_report(uri, run_id, out / "report")

    t0 = time.perf_counter()
    weights = run_dir / "model.safetensors"  # consolidated by the trainer at the end of a tracked run
    hf_dir = export(str(weights), out / "hf", overwrite=True)
    err = parity_check(str(weights), hf_dir)
    log.info("demo: HF export logit parity with the checkpoint: max |diff| = %.2e", err)
    _stage("export", t0)
    return DemoResult(manifest.parent, run_dir, uri, run_id, plots, weights, hf_dir)
