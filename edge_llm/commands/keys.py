"""`edge-llm keys add|list|revoke`: the API keys file that `serve --keys-file` checks requests against."""

from __future__ import annotations

import argparse

from edge_llm.keys import Limits, add_key, load_entries, revoke_key


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage API keys and their rate limits (serve --keys-file)")
    actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a key; prints it once (last line), stores only its hash")
    add.add_argument("--keys-file", required=True, metavar="FILE")
    add.add_argument("--name", required=True, help="the identity: logs, limits, MQTT username, [keys] uids")
    add.add_argument("--requests-per-minute", type=int, default=0, metavar="R", help="0 = no limit")
    add.add_argument("--tokens-per-minute", type=int, default=0, metavar="T", help="prompt + completion")
    add.add_argument("--max-concurrent", type=int, default=0, metavar="C", help="queued or running at once")
    add.set_defaults(handler=_add)
    ls = actions.add_parser("list", help="names, limits and creation times (never the keys)")
    ls.add_argument("--keys-file", required=True, metavar="FILE")
    ls.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", help="delete a key; a running server stops accepting it")
    revoke.add_argument("--keys-file", required=True, metavar="FILE")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(handler=_revoke)


def _add(args: argparse.Namespace) -> int:
    limits = Limits(args.requests_per_minute, args.tokens_per_minute, args.max_concurrent)
    key = add_key(args.keys_file, args.name, limits)
    print(f"added key {args.name!r} to {args.keys_file}; it is shown only now:")
    print(key)
    return 0


def _list(args: argparse.Namespace) -> int:
    def limit(n: int) -> str:
        return str(n) if n else "-"

    print(f"{'name':24} {'req/min':>8} {'tok/min':>8} {'concur.':>8}  created")
    for e in load_entries(args.keys_file):
        lim = e.limits
        print(
            f"{e.name:24} {limit(lim.requests_per_minute):>8} {limit(lim.tokens_per_minute):>8} "
            f"{limit(lim.max_concurrent):>8}  {e.created}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    if not revoke_key(args.keys_file, args.name):
        print(f"edge-llm: no key named {args.name!r} in {args.keys_file}")
        return 1
    print(f"revoked {args.name!r}")
    return 0
