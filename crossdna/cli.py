"""The ``crossdna`` command. Each subsystem registers its subcommands; imports stay lazy so ``--help`` is fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand module -> each exposes ``register(subparsers)``; a module's heavy imports happen inside handlers.
_MODULES = (
    "crossdna.commands.info",
    "crossdna.commands.train",
    "crossdna.commands.export_weights",
    "crossdna.commands.doctor",
    "crossdna.commands.shard",
    "crossdna.commands.report",
    "crossdna.commands.finetune",
    "crossdna.commands.benchmark",
    "crossdna.commands.export",
    "crossdna.commands.embed",
    "crossdna.commands.import_upstream",
    "crossdna.commands.bench",
    "crossdna.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossdna", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError) as e:
        # Bad input (ConfigError is a ValueError) is reported in one line naming the file/field; tracebacks are
        # for bugs.
        print(f"crossdna {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
