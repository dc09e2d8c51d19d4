"""`edge-llm keygen`, `edge-llm sign` (workstation) and `edge-llm update` (board): signed bundles."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    keygen = sub.add_parser("keygen", help="new ed25519 key pair for signing bundles (extra: ota)")
    keygen.add_argument("--private", required=True, type=Path, help="private key file to write (0600)")
    keygen.add_argument(
        "--public", required=True, type=Path, help="public key file to write (goes on boards)"
    )
    keygen.set_defaults(handler=run_keygen)

    sign = sub.add_parser("sign", help="sign a bundle: writes BUNDLE/bundle.sig over its bundle.json")
    sign.add_argument("--bundle", required=True, type=Path)
    sign.add_argument("--key", required=True, type=Path, help="private key from `edge-llm keygen`")
    sign.set_defaults(handler=run_sign)

    update = sub.add_parser(
        "update", help="install a signed bundle into the inactive A/B slot, self-test it, switch"
    )
    update.add_argument("--prefix", type=Path, default=Path("/opt/edge-llm"), help="install prefix")
    update.add_argument("--from", dest="source", type=Path, help="signed bundle folder or .tar of one")
    update.add_argument("--trusted-key", type=Path, help="public key the update must be signed with")
    update.add_argument("--config", type=Path, help="board profile for the self-test's providers")
    update.add_argument("--rollback", action="store_true", help="switch back to the other slot")
    update.set_defaults(handler=run_update)


def run_keygen(args: argparse.Namespace) -> int:
    from edge_llm.ota import keygen

    kid = keygen(args.private, args.public)
    print(f"key {kid}: private {args.private} (keep it off boards), public {args.public}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from edge_llm.ota import sign

    print(f"signed: {sign(args.bundle, args.key)}")
    return 0


def run_update(args: argparse.Namespace) -> int:
    from edge_llm.errors import ConfigError
    from edge_llm.ota import apply_update, rollback

    if args.rollback:
        print(f"active slot: {rollback(args.prefix)}; restart the service: systemctl restart edge-llm")
        return 0
    if args.source is None or args.trusted_key is None:
        raise ConfigError("update needs --from SOURCE and --trusted-key PUBLIC_KEY (or --rollback)")
    r = apply_update(args.prefix, args.source, args.trusted_key, args.config)
    print(f"self-test answered: {r.answer.strip()!r}")
    print(
        f"active: {r.bundle} (bundle.json sha256 {r.sha256[:16]}…) in slot {r.slot}"
        f" (was {r.previous or 'a plain folder'}); restart the service: systemctl restart edge-llm"
    )
    return 0
