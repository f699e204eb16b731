"""``crossdna export-weights CKPT OUT.safetensors``: one fp32 safetensors file from a checkpoint of any strategy."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-weights", help="consolidate a DDP/FSDP/ZeRO checkpoint into one safetensors file")
    p.add_argument("checkpoint", help="a checkpoint directory (step-N), a run's checkpoints/ or its run directory "
                                      "(then: the latest checkpoint)")
    p.add_argument("out", help="output .safetensors path")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from launcher.export import export_weights

    out = export_weights(args.checkpoint, args.out)
    print(out)
    return 0
