"""``crossdna train``: pretraining, the same entry point as ``python -m launcher.train`` (docs/training.md)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain CrossDNA (plain python, torchrun or deepspeed; DDP/FSDP/ZeRO)",
                       description="Pretrain CrossDNA. Under torchrun/deepspeed every rank runs this command. "
                                   "Exit codes: 0 done, 75 preempted (checkpoint written, requeue), "
                                   "3 non-finite loss, 2 bad config/data/checkpoint.")
    p.add_argument("--config", required=True, help="YAML training config (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.train import train

    return train(args.config, args.overrides)
