"""``crossdna shard``: build, extract (one Slurm part), merge, verify and summarise tar shards (sharding/)."""
from __future__ import annotations

import argparse
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="shard config YAML (configs/shard/*.yaml)")
    p.add_argument("--out", required=True, help="output directory (manifest.json + {split}/shard-*.tar)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. window_length=2048")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all usable cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="FASTA (+BED) -> globally shuffled, checksummed tar shards + manifest")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="extract and write all shards on this machine (resumable)")
    _config_args(b)
    _run_args(b)
    b.add_argument("--overwrite", action="store_true", help="replace shards built with other parameters")
    e = actions.add_parser("extract", help="extract one part of the windows (a Slurm array task)")
    _config_args(e)
    _run_args(e)
    e.add_argument("--part", type=int, required=True, help="this part, 0-based (SLURM_ARRAY_TASK_ID)")
    e.add_argument("--num-parts", type=int, required=True, help="number of parts (SLURM_ARRAY_TASK_COUNT)")
    m = actions.add_parser("merge", help="permute all extracted parts and write the shards + manifest")
    m.add_argument("out", help="output directory of the extract parts")
    _run_args(m)
    v = actions.add_parser("verify", help="recompute every shard's sha256, size and sample count")
    v.add_argument("out", help="shard directory (or its manifest.json)")
    s = actions.add_parser("stats", help="summarise a shard directory's manifest")
    s.add_argument("out", help="shard directory (or its manifest.json)")
    s.add_argument("--json", action="store_true", help="print the manifest's stats as JSON")
    p.set_defaults(handler=run)


def _config(args: argparse.Namespace):
    from crossdna.config import load
    from sharding.config import ShardConfig
    return load(ShardConfig, args.config, args.overrides)


def run(args: argparse.Namespace) -> int:
    from sharding import build, verify

    if args.action == "build":
        path = build.build_shards(_config(args), args.out, workers=args.workers, overwrite=args.overwrite,
                                  progress=not args.quiet)
        print(path)
    elif args.action == "extract":
        ran = build.extract_part(_config(args), args.out, args.part, args.num_parts, workers=args.workers,
                                 progress=not args.quiet)
        print(f"part {args.part}/{args.num_parts}: {ran} tasks extracted")
    elif args.action == "merge":
        print(build.merge(args.out, workers=args.workers, progress=not args.quiet))
    elif args.action == "verify":
        checked, problems = verify.verify(args.out)
        for problem in problems:
            print(f"BAD {problem}", file=sys.stderr)
        print(f"{checked} shards checked, {len(problems)} bad")
        return 1 if problems else 0
    elif args.action == "stats":
        if args.json:
            import json

            from sharding.manifest import load_manifest
            print(json.dumps(load_manifest(args.out)["stats"], indent=1))
        else:
            print(verify.summary(args.out))
    return 0
