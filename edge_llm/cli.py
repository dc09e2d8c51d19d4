"""`edge-llm` command line: one subcommand per module in `edge_llm.commands`.

Each command module offers `register(subparsers)`; modules import heavy things (the export
pipeline, paho) inside their handlers so `edge-llm doctor` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Importing the package first sets ORT_DISABLE_TELEMETRY=1 (unless the user set it) before any
# command can import onnxruntime: see edge_llm/__init__.py.
from edge_llm import __version__
from edge_llm.errors import EdgeLLMError

COMMAND_MODULES = ("export", "generate", "doctor", "serve", "bench", "cache", "pack", "ota")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-llm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-llm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"edge_llm.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edge_llm.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args) or 0)
    except EdgeLLMError as exc:
        print(f"edge-llm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
