"""``crossdna report RUN_ID``: loss, throughput and GPU/host plots (PNG) of a tracked run."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render loss/throughput/GPU plots (PNG) of a tracked MLflow run")
    p.add_argument("run_id", metavar="RUN_ID", help="MLflow run id (logged by the trainer, also in trainer.json)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tracking-uri", help="tracking store (default: $MLFLOW_TRACKING_URI)")
    where.add_argument("--run-dir", type=Path, help="run directory holding the default sqlite store mlflow.db")
    p.add_argument("--out", type=Path, help="output folder (default: ./report-RUN_ID)")
    p.set_defaults(handler=run)


def _tracking_uri(args: argparse.Namespace) -> str:
    if args.tracking_uri:
        return args.tracking_uri
    if args.run_dir is not None:
        db = args.run_dir / "mlflow.db"
        if not db.is_file():
            raise ValueError(f"{db}: no tracking store in this run directory")
        return f"sqlite:///{db.resolve()}"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise ValueError("no tracking store: pass --tracking-uri or --run-dir, or set MLFLOW_TRACKING_URI")


def run(args: argparse.Namespace) -> int:
    from launcher.report_plots import render_report

    out = args.out or Path(f"report-{args.run_id}")
    for path in render_report(_tracking_uri(args), args.run_id, out):
        print(path)
    return 0
