"""`edge-llm serve` (run the model behind the socket / MQTT protocol) and `edge-llm send` (a client)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from typing import Any

from edge_llm.commands.generate import (
    add_engine_args,
    add_sampling_args,
    load_engine,
    messages_for,
    prompt_text,
)
from edge_llm.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="serve prompts over a local socket, MQTT and/or HTTP until SIGINT/SIGTERM"
    )
    add_engine_args(serve)
    serve.add_argument("--socket", metavar="PATH", help="Unix socket to listen on (created with mode 0600)")
    serve.add_argument("--tcp", type=int, metavar="PORT", help="also listen on 127.0.0.1:PORT")
    serve.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker (overrides [mqtt] host/port)")
    serve.add_argument("--device", help="device id: topics edge-llm/<device>/... (overrides [mqtt] device)")
    serve.add_argument("--mqtt-protocol", choices=("5", "3.1.1"), help="MQTT version (default 5)")
    serve.add_argument("--fleet", metavar="GROUP", help="also serve $share/GROUP/edge-llm/fleet/generate")
    serve.add_argument(
        "--http", metavar="HOST:PORT", help="OpenAI-compatible HTTP API (extra 'http'; overrides [http])"
    )
    serve.add_argument(
        "--keys-file",
        metavar="FILE",
        help="require API keys from FILE (edge-llm keys; overrides [keys])",
    )
    serve.add_argument(
        "--metrics", metavar="HOST:PORT", help="Prometheus /metrics (extra `metrics`; [metrics] listen)"
    )
    serve.add_argument(
        "--metrics-interval", type=float, metavar="S",
        help="retained MQTT summary on edge-llm/<device>/metrics every S seconds ([mqtt] metrics_interval_s)",
    )  # fmt: skip
    serve.add_argument("--grpc", metavar="HOST:PORT", help="gRPC LLMService (extra `grpc`; [grpc] listen)")
    serve.add_argument("--state", metavar="FILE", help="SQLite state file (default [server] state_dir)")
    serve.add_argument("--system-prompt", help="system prompt for new conversations (overrides [sessions])")
    serve.add_argument(
        "--trusted-key", metavar="FILE", help="take signed bundle updates over MQTT ([ota] trusted_key)"
    )
    serve.set_defaults(handler=run_serve)

    send = sub.add_parser("send", help="send one prompt to a running `edge-llm serve` and stream the answer")
    where = send.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="Unix socket of the server")
    where.add_argument("--tcp", type=int, metavar="PORT", help="server on 127.0.0.1:PORT")
    where.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker (with --device or --fleet)")
    send.add_argument("--device", help="device id to address over MQTT")
    send.add_argument("--fleet", action="store_true", help="address the fleet topic (any device)")
    send.add_argument("--mqtt-protocol", choices=("5", "3.1.1"), default="5")
    send.add_argument("--user", help="MQTT username")
    send.add_argument("--password-file", help="file holding the MQTT password")
    send.add_argument("--ca", help="CA certificate: connect to the broker with TLS")
    send.add_argument("--cert", help="client certificate (TLS)")
    send.add_argument("--key", help="client key (TLS)")
    add_sampling_args(send, max_tokens=None)
    send.add_argument("prompt", help="the prompt (sent as a user message unless --raw)")
    send.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    send.add_argument("--system", help="system message (not with --session after its first turn)")
    send.add_argument("--session", help="conversation id: the server keeps the history")
    send.add_argument("--id", help="request id (default: a random one); a repeat gets the stored answer")
    send.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    send.add_argument("--deadline-ms", type=int, help="give up on the server side after this long")
    send.add_argument("--timeout", type=float, default=120.0, help="client timeout in seconds")
    send.add_argument("--stats", action="store_true", help="print usage as one JSON line on stderr")
    send.set_defaults(handler=run_send)


def _host_port(value: str, default_port: int = 1883, option: str = "--mqtt") -> tuple[str, int]:
    host, _, port = value.rpartition(":") if ":" in value else (value, "", str(default_port))
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise ConfigError(f"{option}: expected HOST:PORT, got {value!r}") from None


def board_with_overrides(args: argparse.Namespace) -> Any:
    from edge_llm.board import load_board

    board = load_board(args.config)
    sock = board.socket
    if args.socket is not None or args.tcp is not None:
        sock = dataclasses.replace(
            sock,
            path=args.socket if args.socket is not None else sock.path,
            tcp_port=args.tcp if args.tcp is not None else sock.tcp_port,
        )
    mqtt = board.mqtt
    changes: dict[str, Any] = {}
    if args.mqtt:
        changes["host"], changes["port"] = _host_port(args.mqtt)
    if args.device:
        changes["device"] = args.device
    if args.mqtt_protocol:
        changes["protocol"] = args.mqtt_protocol
    if args.fleet:
        changes["fleet_group"] = args.fleet
    if args.metrics_interval is not None:
        changes["metrics_interval_s"] = args.metrics_interval
    sessions = board.sessions
    if args.system_prompt is not None:
        sessions = dataclasses.replace(sessions, system_prompt=args.system_prompt)
    http, keys = board.http, board.keys
    try:
        if getattr(args, "http", None):
            host, port = _host_port(args.http, 8080, "--http")
            http = dataclasses.replace(http, host=host, port=port)
        if getattr(args, "keys_file", None):
            keys = dataclasses.replace(keys, file=args.keys_file)
        mqtt = dataclasses.replace(mqtt, **changes)
        metrics = dataclasses.replace(board.metrics, listen=args.metrics) if args.metrics else board.metrics
        grpc = dataclasses.replace(board.grpc, listen=args.grpc) if args.grpc else board.grpc
        trusted = getattr(args, "trusted_key", None)
        ota = dataclasses.replace(board.ota, trusted_key=trusted) if trusted else board.ota
        return dataclasses.replace(
            board, socket=sock, mqtt=mqtt, sessions=sessions, http=http, keys=keys, metrics=metrics,
            grpc=grpc, ota=ota,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_serve(args: argparse.Namespace) -> int:
    from edge_llm.server import Server

    board = board_with_overrides(args)
    # SIGHUP (`systemctl reload`) would kill us before run_until_signal takes it over: from here
    # on it is remembered and served once the server runs.
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda _s, _f: reload.set())
    # Each MQTT connect and reconnect is logged at INFO: show those without -v (they are what an
    # operator looks for first when a device seems unreachable).
    mqtt_log = logging.getLogger("edge_llm.transports.mqtt")
    if mqtt_log.getEffectiveLevel() > logging.INFO:
        mqtt_log.setLevel(logging.INFO)
    _count_start(args, board)
    engine, board = load_engine(args, board)
    server = Server(engine, board, state_path=args.state)
    server.start()
    where = []
    if server.socket is not None:
        if server.socket.path is not None:
            where.append(f"unix:{server.socket.path}")
        if server.socket.tcp_port is not None:
            where.append(f"tcp:127.0.0.1:{server.socket.tcp_port}")
    if server.mqtt is not None:
        where.append(f"mqtt://{board.mqtt.host}:{board.mqtt.port} ({server.mqtt.topics.generate})")
    if server.http is not None:
        where.append(f"{server.http.url}/v1 (model {server.http.model_id})")
    if server.grpc is not None:
        where.append(f"grpc:{server.grpc.host}:{server.grpc.port}")
    if server.metrics_server is not None:
        where.append(f"metrics: http://{server.metrics_server.host}:{server.metrics_server.port}/metrics")
    print(f"edge-llm: serving {engine.bundle.name} on {', '.join(where)}", file=sys.stderr, flush=True)
    server.run_until_signal(reload)
    return 0


def _count_start(args: argparse.Namespace, board: Any) -> None:
    """After an update switched slots: count this start, or roll back when the last
    `[ota] failed_starts` starts never reached READY (edge_llm/ota.py, `boot_check`)."""
    from edge_llm import ota
    from edge_llm.paths import resolve_bundle
    from edge_llm.server import ota_dir, state_file

    state = ota_dir(state_file(board, args.state))
    done = ota.boot_check(state, resolve_bundle(args.bundle), board.ota.failed_starts)
    if done is not None:
        print(f"edge-llm: update: {done}", file=sys.stderr, flush=True)


def run_send(args: argparse.Namespace) -> int:
    from edge_llm.client import MqttClient, SocketClient

    prompt_text(args.prompt)
    if args.mqtt:
        if not args.fleet and not args.device:
            raise ConfigError("--mqtt needs --device ID or --fleet")
        from edge_llm.mqtt_common import read_password

        host, port = _host_port(args.mqtt)
        password = read_password(args.password_file, "--password-file")
        client = MqttClient(
            host,
            port,
            device=None if args.fleet else args.device,
            fleet=args.fleet,
            protocol_version=args.mqtt_protocol,
            username=args.user,
            password=password,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            timeout=args.timeout,
            # Fail at once, naming the devices that are online, instead of waiting out --timeout
            # for a device that is not there (its retained status says so).
            require_online=True,
        )
    else:
        client = SocketClient(args.socket, tcp_port=args.tcp, timeout=args.timeout)
    if args.raw and args.session:
        raise ConfigError("--raw cannot be used with --session (a session turn is a chat message)")
    content: dict[str, Any] = (
        {"prompt": args.prompt} if args.raw else {"messages": messages_for(args.prompt, args.system)}
    )
    fields = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
        session=args.session,
        deadline_ms=args.deadline_ms,
        request_id=args.id,
    )
    result: Any = None
    with client:
        if args.no_stream:
            result = client.generate(**content, **fields)
            sys.stdout.write(result.text)
        else:
            stream = client.stream(**content, **fields)
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
            result = stream.result
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.stats and result is not None:
        print(json.dumps({"finish_reason": result.finish_reason, **result.usage}), file=sys.stderr)
    return 0
