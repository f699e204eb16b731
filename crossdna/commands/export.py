"""``crossdna export``: a self-contained HuggingFace directory (config, safetensors, tokenizer, modeling code)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a HuggingFace directory loadable with trust_remote_code=True")
    p.add_argument("--model", required=True,
                   help="consolidated .safetensors (crossdna export-weights / import-upstream), an exported HF "
                        "directory, or a pretraining checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-parity-check", action="store_true",
                   help="skip reloading the export and comparing its logits with the source model's")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from crossdna.hf.export import export, parity_check

    out = export(args.model, args.out, overwrite=args.overwrite)
    if not args.no_parity_check:
        diff = parity_check(args.model, out)
        print(f"parity: max |logit difference| = {diff:.2e} (fp32, CPU, two 1,100-bp chr20 windows)")
    print(out)
    return 0
