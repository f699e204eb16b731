"""``crossdna bench train-step``: throughput, memory and MFU of a full pretraining step (see docs/performance.md)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="performance benchmarks (GPU)")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser("train-step", help="tokens/s, s/step, peak memory and MFU of one training step",
                       description="Times full pretraining steps (student + EMA teacher, every loss on, AdamW, EMA "
                                   "update) on real chr20 windows after warm-up, and writes a JSON report.")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 150], help="batch sizes (default: 32 150)")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--preset", default="8m", help="model preset (default: 8m)")
    p.add_argument("--kernels", default="fused", choices=["fused", "reference", "auto"])
    p.add_argument("--comba-precision", default="fp32", choices=["fp32", "autocast"],
                   help="fp32: Comba outside autocast as upstream (default); autocast: bf16 Comba")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast at all (fp32 + TF32 everywhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers (crossdna.model.compile)")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="with --compile: torch.compile's mode (max-autotune: inductor times Triton templates "
                        "against cuBLAS and FlexAttention's tile configs; minutes more warm-up)")
    p.add_argument("--activation-budget", type=float, default=1.0, metavar="F",
                   help="with --compile: keep about this fraction of the saved activations, recompute the rest")
    p.add_argument("--overlap-teacher", action="store_true",
                   help="run the teacher's passes on a second CUDA stream beside the student's forward")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole step as one CUDA graph after the warm-up and replay it")
    p.add_argument("--swa-kernel", default="flex", choices=["flex", "fla", "sdpa"])
    p.add_argument("--gram", default="off", choices=["off", "exact", "fast"], help="semantic loss Gram term")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (autotune, compilation)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps (kernel breakdown)")
    p.add_argument("--fasta", default=None,
                   help="GRCh37 chr20 FASTA with .fai/.gzi (default: ../shared/data/human_chr20_grch37/20.fa.gz)")
    p.add_argument("--tag", default="", help="name of the result file (default: derived from the options)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: benchmarks/results)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from crossdna.bench.train_step import DEFAULT_FASTA, BenchConfig, run as bench

    for name in ("length", "warmup", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.activation_budget <= 1.0:
        raise ValueError(f"--activation-budget must be in [0, 1], got {args.activation_budget}")
    for name, default in (("activation_budget", 1.0), ("compile_mode", "default")):
        if getattr(args, name) != default and not args.compile:
            raise ValueError(f"--{name.replace('_', '-')} acts on the compiled layers: add --compile")
    if any(b < 1 for b in args.batch):
        raise ValueError(f"--batch sizes must be >= 1, got {args.batch}")
    cfg = BenchConfig(batch_sizes=tuple(args.batch), length=args.length, preset=args.preset, kernels=args.kernels,
                      comba_precision=args.comba_precision, amp=not args.no_amp, compile=args.compile,
                      compile_mode=args.compile_mode, activation_budget=args.activation_budget,
                      cuda_graph=args.cuda_graph, overlap_teacher=args.overlap_teacher, swa_kernel=args.swa_kernel,
                      gram=args.gram, warmup=args.warmup, steps=args.steps, profile_steps=args.profile,
                      fasta=args.fasta or str(DEFAULT_FASTA), tag=args.tag)
    report = bench(cfg, Path(args.out))
    print(f"wrote {report['path']}")
    return 0
