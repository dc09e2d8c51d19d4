"""`edge-llm` command line: one subcommand per module in `edge_llm.commands`.

Each command module offers `register(subparsers)`; modules import heavy things (the export
pipeline, paho) inside their handlers so `edge-llm doctor` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

# Importing the package first sets ORT_DISABLE_TELEMETRY=1 (unless the user set it) before any
# command can import onnxruntime: see edge_llm/__init__.py.
from edge_llm import __version__
from edge_llm.errors import EdgeLLMError

COMMAND_MODULES = ("export", "generate", "doctor", "serve", "keys", "bench", "cache", "pack", "ota")


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it has no default worth showing (None,
    False, empty) or its help already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if _shows_default(action) and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):  # argparse skips help-less options
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    # identity, not `in`: 0 == False, and a default of 0 (--top-k) is worth showing
    hidden = action.default is None or action.default is False or action.default == []
    return bool(action.option_strings) and not hidden and action.default != argparse.SUPPRESS


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser shows defaults (subparsers are built with the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edge-llm", description=__doc__.splitlines()[0])
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
    return run_handler(args.handler, args)


def run_handler(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command the way every edge-llm command runs: logging from -v, an EdgeLLMError as one
    `edge-llm: error:` line and exit status 2, no traceback for Ctrl-C or a closed pipe."""
    level = logging.WARNING - 10 * min(getattr(args, "verbose", 0), 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = int(handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here when everything fitted in the buffer
        return code
    except BrokenPipeError:
        # `edge-llm cache | head`: the reader has gone, which is not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's last flush does not raise again, and exit
        # as a tool killed by SIGPIPE would (128 + 13), which `set -o pipefail` scripts expect.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except EdgeLLMError as exc:
        print(f"edge-llm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
