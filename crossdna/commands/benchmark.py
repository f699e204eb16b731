"""``crossdna benchmark``: finetune every task of a suite with k seeds; results.md + results.json + MLflow runs."""
from __future__ import annotations

import argparse
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parents[2] / "configs" / "finetune"


def suite_config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    path = SUITES_DIR / f"{args.suite.replace('-', '_')}.yaml"
    if not path.is_file():
        known = sorted(p.stem.replace("_", "-") for p in SUITES_DIR.glob("*.yaml"))
        raise ValueError(f"--suite {args.suite}: no {path}; known suites: {known}")
    return path


def add_common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="suite config YAML (configs/finetune/*.yaml)")
    src.add_argument("--suite", help="a shipped suite by name, e.g. gue-tf (configs/finetune/gue_tf.yaml)")
    p.add_argument("--init", default="scratch",
                   help="'scratch', a consolidated .safetensors (crossdna export-weights / import-upstream), an "
                        "exported HF directory, or a pretraining checkpoint directory (default: scratch)")
    p.add_argument("--out", required=True, help="output directory (results.json, results.md, MLflow store)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.max_steps=200 train.device=cuda data_root=/data")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="finetune a suite of tasks with k seeds and tabulate mean ± std")
    add_common(p)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..k-1 (default: the config's seeds)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's task names")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from crossdna.finetune.benchmark import run_benchmark
    from crossdna.finetune.config import BenchmarkConfig

    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds: need at least 1, got {args.seeds}")
    cfg = BenchmarkConfig.load(suite_config_path(args), args.overrides)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    out = run_benchmark(cfg, args.init, args.out, tasks, list(range(args.seeds)) if args.seeds else None,
                        tracking=not args.no_tracking, progress=not args.quiet)
    print(out.markdown_path.read_text(), end="")
    print(f"wrote {out.json_path} and {out.markdown_path}")
    return 0
