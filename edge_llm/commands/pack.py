"""`edge-llm pack`: a board package (wheelhouse + bundle + profile + unit + install.sh)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="write a self-contained board package to install offline (needs network, not on the board)",
    )
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder written by `edge-llm export`")
    p.add_argument("--board", required=True, type=Path, help="board profile TOML (configs/boards/NAME.toml)")
    p.add_argument("--arch", required=True, help="the board's CPU: x86_64 or aarch64")
    p.add_argument("--python", default="3.11", help="the board's python3 version (default 3.11)")
    p.add_argument("--tar", action="store_true", help="also write OUT.tar next to the folder")
    p.add_argument("--out", required=True, type=Path, help="package folder to create (new or empty)")
    p.set_defaults(handler=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from edge_llm.pack import describe, pack

    result = pack(args.bundle, args.board, args.arch, args.python, args.out, tar=args.tar)
    print(describe(result))
    print(f"install on the board: sh {args.out.name}/install.sh [--prefix /opt/edge-llm] [--no-service]")
    return 0
