"""``crossdna embed``: FASTA → one representation vector per record (.npy), or per position (.npz)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed FASTA records with a model (mean over positions, or per position)")
    p.add_argument("--model", required=True, help="exported HF directory, consolidated .safetensors or checkpoint dir")
    p.add_argument("--fasta", required=True, help="input FASTA (.gz allowed)")
    p.add_argument("--out", required=True, help="output path: OUT.npy [N, d] (or OUT.npz with --per-position)")
    p.add_argument("--per-position", action="store_true", help="keep every position: OUT.npz (embeddings, lengths)")
    p.add_argument("--tokens-per-batch", type=int, default=65536, help="batch size in tokens (default 65536)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1…")
    p.add_argument("--strict-letters", action="store_true",
                   help="reject letters other than ACGTN (default: IUPAC codes are read as N)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from crossdna.finetune.embed import embed_fasta

    if args.tokens_per_batch < 1:
        raise ValueError(f"--tokens-per-batch: must be >= 1, got {args.tokens_per_batch}")
    out = embed_fasta(args.model, args.fasta, args.out, args.per_position, args.tokens_per_batch, args.device,
                      "error" if args.strict_letters else "to_n", progress=not args.quiet)
    print(out)
    return 0
