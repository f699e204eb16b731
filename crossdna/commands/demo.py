"""``crossdna demo``: shard the bundled chr20 slice, pretrain the tiny model on CPU, log to a local MLflow store,
render the run's plots and export it (crossdna/demo/run.py)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the bundled real chr20 slice (CPU, a few minutes)")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--overwrite", action="store_true", help="rebuild shards made earlier with other parameters")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides of configs/pretrain/demo.yaml, e.g. trainer.steps=50")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from crossdna.demo.run import run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_demo(args.out, args.overrides, overwrite=args.overwrite)
    print(f"""
CrossDNA demo finished.
  shards        {result.shards}  (crossdna shard stats {result.shards})
  run           {result.run_dir}
  MLflow run    {result.run_id}
                review: mlflow ui --backend-store-uri {result.tracking_uri}
  plots         {', '.join(str(p) for p in result.plots)}
  weights       {result.weights}  (also the MLflow artifact model/)
  HF export     {result.hf_dir}
                AutoModelForMaskedLM.from_pretrained("{result.hf_dir}", trust_remote_code=True)""")
    return 0
