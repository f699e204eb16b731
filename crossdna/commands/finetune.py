"""``crossdna finetune``: one task of a suite config with one seed (the same runner and outputs as benchmark)."""
from __future__ import annotations

import argparse

from crossdna.commands.benchmark import add_common, suite_config_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="finetune one task (classification, multilabel or regression head)")
    add_common(p)
    p.add_argument("--task", default=None, help="task name in the suite (default: the suite's only task)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from crossdna.finetune.benchmark import run_benchmark
    from crossdna.finetune.config import BenchmarkConfig

    cfg = BenchmarkConfig.load(suite_config_path(args), args.overrides)
    if args.task is None and len(cfg.tasks) > 1:
        raise ValueError(f"--task: the suite has {len(cfg.tasks)} tasks {[t.name for t in cfg.tasks]}; name one")
    task = args.task or cfg.tasks[0].name
    out = run_benchmark(cfg, args.init, args.out, [task], [args.seed], tracking=not args.no_tracking,
                        progress=not args.quiet)
    result = out.rows[0]["runs"][0]
    print(f"{task} seed {args.seed}: best step {result['best_step']}/{result['steps']}, "
          f"val {result['metric']}={result['val'][result['metric']]:.4f}, "
          + ", ".join(f"test {k}={v:.4f}" for k, v in result["test"].items()))
    print(f"wrote {out.json_path}")
    return 0
