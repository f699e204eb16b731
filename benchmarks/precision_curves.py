"""Does bf16 training track fp32? Loss curves of several seeds per precision on the same chr20 batches.

    python benchmarks/precision_curves.py run --precision bf16 --seed 0 --out DIR      # one run (GPU), DIR/bf16-0.json
    python benchmarks/precision_curves.py combine DIR --out benchmarks/results/precision_curves_h100

One run (``crossdna.bench.precision.train_curve``): the 8.1M preset from the seed's init with the seed's dropout
draws, ``--steps`` AdamW steps at a constant ``--lr`` on batches of real chr20 windows (the same batches, in the
same order, for every run), every loss term on, fused kernels; masked-LM CE on held-out windows at step 0, every
``--eval-every`` steps and at the end. Precisions:
``fp32`` (fp32 everywhere, TF32 off), ``bf16`` (bf16 autocast, Comba too), ``upstream`` (fp32 Comba, bf16 autocast
elsewhere: the upstream recipe). ``combine`` writes OUT.json (per precision: every seed's curve, mean and spread)
and OUT.png. The point of several seeds: a gap between precisions means something only next to the gap between
seeds of one precision.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from crossdna.bench.precision import PRECISIONS

WINDOW = 20


def run(args: argparse.Namespace) -> None:
    from crossdna.bench.precision import train_curve
    from crossdna.bench.train_step import DEFAULT_FASTA, environment

    out = train_curve(args.precision, args.seed, args.fasta or str(DEFAULT_FASTA), args.steps, args.batch, args.lr,
                      args.eval_every, progress=lambda line: print(line, flush=True))
    path = Path(args.out) / f"{args.precision}-{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**out, **environment()}) + "\n")


def combine(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("*-*.json"))]
    if not runs:
        raise SystemExit(f"{args.dir}: no run files (<precision>-<seed>.json)")
    by_precision: dict[str, list[dict]] = {}
    for r in runs:
        by_precision.setdefault(r["precision"], []).append(r)
    summary = {"runs": runs, "precisions": {}}
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, group), color in zip(sorted(by_precision.items()), ("tab:blue", "tab:orange", "tab:green")):
        windows = [[statistics.fmean(r["loss"][i:i + WINDOW]) for i in range(0, len(r["loss"]), WINDOW)]
                   for r in group]
        final_eval = [r["eval_ce"][str(r["steps"])] for r in group]
        summary["precisions"][name] = {
            "seeds": [r["seed"] for r in group],
            "window_mean": [statistics.fmean(w) for w in zip(*windows)],
            "window_min": [min(w) for w in zip(*windows)], "window_max": [max(w) for w in zip(*windows)],
            "final_eval_ce": final_eval, "final_eval_ce_mean": statistics.fmean(final_eval),
            "final_eval_ce_std": statistics.stdev(final_eval) if len(final_eval) > 1 else 0.0}
        for k, (r, w) in enumerate(zip(group, windows)):
            x = [WINDOW * (i + 0.5) for i in range(len(w))]
            ax_train.plot(x, w, color=color, alpha=0.8, label=name if k == 0 else None)
            steps = sorted(int(s) for s in r["eval_ce"])
            ax_eval.plot(steps, [r["eval_ce"][str(s)] for s in steps],
                         "o-", color=color, alpha=0.8, label=name if k == 0 else None)
    first = runs[0]
    ax_train.set(xlabel="step", ylabel=f"training loss ({WINDOW}-step mean)",
                 title=f"8.1M, chr20, B={first['batch']}, lr {first['lr']:g}: one line per seed")
    ax_eval.set(xlabel="step", ylabel="held-out masked-LM CE", title="validation (4 held-out batches)")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in summary["precisions"].items():
        print(f"{name:9s} seeds {s['seeds']}: final eval CE {s['final_eval_ce_mean']:.4f} ± "
              f"{s['final_eval_ce_std']:.4f}; last window {s['window_mean'][-1]:.4f} "
              f"[{s['window_min'][-1]:.4f}, {s['window_max'][-1]:.4f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--precision", choices=sorted(PRECISIONS), required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--eval-every", type=int, default=50)
    r.add_argument("--fasta")
    r.add_argument("--out", required=True)
    c = sub.add_parser("combine")
    c.add_argument("dir")
    c.add_argument("--out", required=True)
    args = parser.parse_args()
    (run if args.command == "run" else combine)(args)


if __name__ == "__main__":
    main()
