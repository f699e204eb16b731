"""One table from several ``crossdna benchmark`` outputs: the same suite finetuned from different inits.

    python benchmarks/compare_finetune.py --out benchmarks/results/gue_tf_h100 \
        scratch=runs/ft/scratch-tf0,runs/ft/scratch-tf1 pretrained=runs/ft/pre-tf0,runs/ft/pre-tf1

Each ``LABEL=DIR[,DIR...]`` names one init; its directories (each with a results.json, e.g. one per task when the
tasks ran as parallel processes) are merged by task. Writes ``OUT.json`` (every seed's test metrics per init and
task, and the sources' provenance) and ``OUT.md`` (mean ± sample std per init, and the difference of the means
per task for the first two inits). Fails if a task is missing for an init or the inits used different seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = ("mcc", "auroc", "accuracy", "macro_f1")


def load_init(dirs: list[Path]) -> tuple[dict[str, dict], list[dict]]:
    tasks, sources = {}, []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path}: not found (did that run finish a task?)")
        data = json.loads(path.read_text())
        sources.append({k: data.get(k) for k in ("suite", "init", "seeds", "device_name", "torch", "git_sha",
                                                  "git_dirty")} | {"dir": str(d)})
        for row in data["tasks"]:
            if row["task"] in tasks:
                raise SystemExit(f"{path}: task {row['task']} appears twice for this init")
            tasks[row["task"]] = {"seeds": row["seeds"], "metric": row["metric"],
                                  "test": {m: [run["test"][m] for run in row["runs"]] for m in METRICS
                                           if all(m in run["test"] for run in row["runs"])}}
    return tasks, sources


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inits", nargs="+", metavar="LABEL=DIR[,DIR...]")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = parser.parse_args(argv)
    inits = {}
    for spec in args.inits:
        label, _, dirs = spec.partition("=")
        if not dirs:
            parser.error(f"{spec!r}: expected LABEL=DIR[,DIR...]")
        inits[label] = load_init([Path(d) for d in dirs.split(",")])
    labels = list(inits)
    task_names = sorted({t for tasks, _ in inits.values() for t in tasks})
    for label, (tasks, _) in inits.items():
        missing = [t for t in task_names if t not in tasks]
        if missing:
            raise SystemExit(f"init {label}: no results for task(s) {missing}")
    for t in task_names:
        seeds = {label: inits[label][0][t]["seeds"] for label in labels}
        if len({tuple(s) for s in seeds.values()}) != 1:
            raise SystemExit(f"task {t}: the inits ran different seeds {seeds}")

    shown = [m for m in ("mcc", "auroc") if all(m in inits[l][0][t]["test"] for l in labels for t in task_names)]
    header = ["task", "seeds"] + [f"{m.upper()} {l}" for m in shown for l in labels]
    if len(labels) >= 2:
        header += [f"Δ{m.upper()} ({labels[1]} − {labels[0]})" for m in shown]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    deltas = {m: [] for m in shown}
    for t in task_names:
        cells = [t, str(len(inits[labels[0]][0][t]["seeds"]))]
        for m in shown:
            for l in labels:
                mu, sd = mean_std(inits[l][0][t]["test"][m])
                cells.append(f"{mu:.3f} ± {sd:.3f}")
        if len(labels) >= 2:
            for m in shown:
                d = statistics.fmean(inits[labels[1]][0][t]["test"][m]) - statistics.fmean(inits[labels[0]][0][t]["test"][m])
                deltas[m].append(d)
                cells.append(f"{d:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if len(labels) >= 2:
        cells = ["mean over tasks", ""]
        for m in shown:
            for l in labels:
                cells.append(f"{statistics.fmean(statistics.fmean(inits[l][0][t]['test'][m]) for t in task_names):.3f}")
        cells += [f"{statistics.fmean(deltas[m]):+.3f}" for m in shown]
        lines.append("| " + " | ".join(cells) + " |")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"inits": {l: {"sources": inits[l][1], "tasks": inits[l][0]} for l in labels}}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
