"""`edge-llm keygen`, `edge-llm sign`, `edge-llm rollout` (workstation) and `edge-llm update`
(on the board from a path, or from the workstation over MQTT to a running device): signed bundles."""

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
    update.add_argument("file", nargs="?", type=Path, help="signed bundle folder or .tar (= --from)")
    update.add_argument("--prefix", type=Path, default=Path("/opt/edge-llm"), help="install prefix")
    update.add_argument("--from", dest="source", type=Path, help="signed bundle folder or .tar of one")
    update.add_argument(
        "--state",
        type=Path,
        help="service state file: count starts, roll back after [ota] failed_starts",
    )
    _mqtt_args(update, "send the update over MQTT to the running device --device (no --prefix)")
    update.add_argument("--device", help="device id to update over MQTT")
    update.add_argument("--trusted-key", type=Path, help="public key the update must be signed with")
    update.add_argument("--config", type=Path, help="board profile for the self-test's providers")
    update.add_argument("--rollback", action="store_true", help="switch back to the other slot")
    update.set_defaults(handler=run_update)

    roll = sub.add_parser("rollout", help="update a fleet over MQTT, canaries first; stop when one fails")
    roll.add_argument("file", type=Path, help="signed bundle folder or .tar of one")
    _mqtt_args(roll, "broker the devices use")
    who = roll.add_mutually_exclusive_group(required=True)
    who.add_argument("--group", help="fleet group: the devices online whose status names it")
    who.add_argument("--devices", help="comma-separated device ids, in rollout order")
    roll.add_argument("--canary", type=int, default=1, metavar="N", help="canaries first (default 1)")
    roll.add_argument("--probe", default="What is the capital of France?", help="health-check prompt")
    roll.add_argument("--health-timeout", type=float, default=120.0, metavar="S")
    roll.set_defaults(handler=run_rollout)


def _mqtt_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mqtt", metavar="HOST:PORT", help=what)
    p.add_argument("--user", help="MQTT username (an operator account: only it may publish updates)")
    p.add_argument("--password-file", help="file holding the MQTT password")
    p.add_argument("--ca", help="CA certificate: connect to the broker with TLS")
    p.add_argument("--cert", help="client certificate (TLS)")
    p.add_argument("--key", help="client key (TLS)")
    p.add_argument("--chunk-size", type=int, default=256 * 1024, metavar="BYTES", help="default 256 KiB")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S", help="per device (default 900)")


def _sender(args: argparse.Namespace) -> object:
    from edge_llm.commands.serve import _host_port
    from edge_llm.mqtt_common import read_password
    from edge_llm.ota_send import Connection, UpdateSender

    host, port = _host_port(args.mqtt)
    password = read_password(args.password_file, "--password-file")
    conn = Connection(host, port, args.user, password, args.ca, args.cert, args.key)
    return UpdateSender(conn, timeout=args.timeout)


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

    source = args.source or args.file
    if args.mqtt:
        if not args.device or source is None:
            raise ConfigError("update --mqtt needs --device ID and the signed bundle (FILE or --from)")
        return _update_over_mqtt(args, source)
    if args.rollback:
        print(f"active slot: {rollback(args.prefix)}; restart the service: systemctl restart edge-llm")
        return 0
    if source is None or args.trusted_key is None:
        raise ConfigError("update needs --from SOURCE and --trusted-key PUBLIC_KEY (or --rollback)")
    state = None
    if args.state is not None:
        from edge_llm.server import ota_dir

        state = ota_dir(args.state)
    r = apply_update(args.prefix, source, args.trusted_key, args.config, state_dir=state)
    print(f"self-test answered: {r.answer.strip()!r}")
    print(
        f"active: {r.bundle} (bundle.json sha256 {r.sha256[:16]}…) in slot {r.slot}"
        f" (was {r.previous or 'a plain folder'}); restart the service: systemctl restart edge-llm"
    )
    return 0


def _update_over_mqtt(args: argparse.Namespace, source: Path) -> int:
    from edge_llm.ota_send import temp_archive

    archive, work = temp_archive(source)
    with work, _sender(args) as sender:  # type: ignore[attr-defined]
        print(f"sending {archive.name} ({archive.stat().st_size} bytes) to {args.device}", flush=True)
        state = sender.send(args.device, archive, chunk_size=args.chunk_size)
        sent = sender.stats["chunks_sent"]
    print(
        f"{args.device}: now serving {state.get('bundle')}"
        f" (bundle.json sha256 {str(state.get('sha256'))[:16]}…)"
        f" in slot {state.get('slot')}; switch {state.get('switch_s')} s; {sent} chunk(s) sent"
    )
    return 0


def run_rollout(args: argparse.Namespace) -> int:
    from edge_llm.errors import ConfigError
    from edge_llm.ota_send import rollout, temp_archive

    if not args.mqtt:
        raise ConfigError("rollout needs --mqtt HOST:PORT")
    if args.canary < 1:
        raise ConfigError("--canary must be ≥ 1")
    archive, work = temp_archive(args.file)
    with work, _sender(args) as sender:  # type: ignore[attr-defined]
        devices = sender.group(args.group) if args.group else [d for d in args.devices.split(",") if d]
        print(f"rollout to {len(devices)} device(s), canar{'y' if args.canary == 1 else 'ies'} first: "
              f"{', '.join(devices)}", flush=True)  # fmt: skip
        report = rollout(
            sender, devices, archive, canary=args.canary, probe=args.probe,
            health_timeout=args.health_timeout, chunk_size=args.chunk_size,
        )  # fmt: skip
    for device, done in report.updated.items():
        print(
            f"  {device}: updated ({done['role']}, slot {done['slot']}, switch {done['switch_s']} s), healthy"
        )
    for device, error in report.failed.items():
        print(f"  {device}: FAILED: {error}")
    if report.untouched:
        print(f"  stopped: {', '.join(report.untouched)} left on the old bundle")
    return 0 if report.ok else 1
