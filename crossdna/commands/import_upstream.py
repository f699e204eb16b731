"""``crossdna import-upstream``: upstream CrossDNA weights (HF release dir or training state dict) → our format."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-upstream", help="convert upstream CrossDNA weights into a consolidated .safetensors")
    p.add_argument("source", help="upstream HF release directory, or a state dict (.safetensors/.pt/.bin/.ckpt)")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--compat", choices=("fixed", "upstream"), default="fixed",
                   help="defect switches of the imported config: 'fixed' (default) or 'upstream' (bit-faithful)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a model config field tensor shapes cannot tell (repeatable), e.g. --set attention.num_heads=8 "
                        "--set attention.window_size=512")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from crossdna.hf.importer import import_upstream

    print(import_upstream(args.source, args.out, args.compat, args.overrides))
    return 0
