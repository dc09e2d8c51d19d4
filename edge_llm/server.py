"""Wiring for `edge-llm serve`: board config + engine + scheduler + sessions + transports.

In: a loaded `Engine` and a `BoardConfig` (its `[server]`, `[sessions]`, `[socket]`, `[mqtt]`,
`[http]`, `[keys]`, `[metrics]`, `[grpc]` sections, already merged with command-line overrides).
Out: a running `Server` — one scheduler worker owning the engine, the SQLite state database,
whichever transports are configured (socket, MQTT, HTTP, gRPC), and its metrics (`self.metrics`:
Prometheus text on `[metrics] listen` and at HTTP's /metrics) — that `stop()` (or SIGINT/SIGTERM
in `run_until_signal`) shuts down cleanly: the scheduler first (queued requests answered `busy`,
the running one given a grace period), then the transports (MQTT status `offline`, socket file
removed).
Under systemd (`Type=notify`) `start()` sends `READY=1` once the transports are up and, when the
unit sets `WatchdogSec`, keeps a watchdog that pings only while the scheduler's worker moves
(`edge_llm.systemd`): a wedged engine gets the service restarted.

SIGHUP (`systemctl reload`) reloads the bundle from its path — after `edge-llm update` switched
the A/B slot link — without a restart: the new engine is loaded and probed beside the old one,
then swapped in between steps (`swap`); running requests finish on the old engine, queued ones
run on the new one. A bundle that fails to load or answer leaves the old one serving.
With `[ota] trusted_key` and MQTT, updates also arrive over MQTT (`edge_llm/ota_mqtt.py`), which
ends in the same `swap`; the status topic names the active bundle, its slot and the last
update's outcome. The OTA state (partial transfer, start counter, last outcome) lives beside the
state file, in `<state>.ota/`.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edge_llm import __version__, ota, protocol, systemd
from edge_llm.board import BoardConfig, parse_listen
from edge_llm.engine import Engine
from edge_llm.errors import ConfigError
from edge_llm.metrics import Metrics, MetricsServer
from edge_llm.scheduler import Scheduler
from edge_llm.sessions import Conversations, StateDB
from edge_llm.transports.base import Dispatcher

log = logging.getLogger(__name__)


class Server:
    def __init__(self, engine: Engine, board: BoardConfig, state_path: str | Path | None = None) -> None:
        self.engine = engine
        self.board = board
        srv = board.server
        # The state dir is ours (0700); a file named with --state may sit in a shared folder.
        own = state_path is None
        path = state_file(board, state_path)
        self.db = StateDB(path, max_finals=srv.max_finals, private_dir=own)
        self.ota_dir = ota_dir(path)
        self.bundle_path = engine.bundle.path  # what --bundle named: the slot link on a board
        pruned = self.db.prune_sessions(board.sessions.ttl_days * 86400)
        if pruned:
            log.info("deleted %d sessions idle for more than %g days", pruned, board.sessions.ttl_days)
        self.conversations = self._conversations(engine)
        self.scheduler = Scheduler(
            engine,
            srv.max_queue,
            srv.max_inflight_per_client,
            conversations=self.conversations,
            finals=self.db,
            default_max_tokens=srv.default_max_tokens,
        )
        keys = None
        if board.keys.file:
            from edge_llm.keys import KeyGate

            keys = KeyGate(board.keys.file, board.keys.uids)
            log.info("API keys from %s: %d key(s)", board.keys.file, len(keys.names()))
        self.dispatcher = Dispatcher(self.scheduler, max_payload=srv.max_payload, keys=keys)
        # A Prometheus registry when it is served here or the library is there for another
        # transport to mount `metrics.render()` (HTTP's /metrics); the plain tallies always.
        prometheus = bool(board.metrics.listen) or _importable("prometheus_client")
        self.metrics = Metrics(self.scheduler, engine, prometheus=prometheus)
        self.dispatcher.observer = self.metrics.finished
        self.socket: Any = None
        self.mqtt: Any = None
        self.http: Any = None
        self.grpc: Any = None
        self.metrics_server: Any = None
        self.ota: Any = None
        self.watchdog: systemd.Watchdog | None = None
        self._stopped = threading.Event()

    def _conversations(self, engine: Engine) -> Conversations:
        cfg = self.board.sessions
        return Conversations(engine, self.db, system_prompt=cfg.system_prompt, max_live=cfg.max_live)

    def reload(self, bundle: str | Path | None = None, timeout: float | None = None) -> Engine:
        """Load `bundle` (default: the current bundle's path, e.g. the slot link), probe it, and
        swap it in; raises (old engine kept) if it does not load or answer."""
        from edge_llm.engine import Slot
        from edge_llm.sampling import SamplingParams

        path = bundle if bundle is not None else self.bundle_path
        engine = Engine.load(path, self.engine.options)
        probe = engine.encode_request(messages=[{"role": "user", "content": "Hello"}])
        engine.complete(probe, SamplingParams(max_tokens=2, ignore_eos=True), Slot())
        if not self.swap(engine, timeout):
            raise ConfigError(f"reload: the running requests did not finish within {timeout} s")
        self.bundle_path = path
        log.info("reloaded: now serving %s from %s", engine.bundle.name, path)
        self.refresh_status()
        return engine

    def swap(self, engine: Engine, timeout: float | None = None) -> bool:
        """Serve with `engine` (loaded and probed by the caller) from the scheduler's next free
        moment on: running requests finish on the old engine, queued and new ones run on the new
        one. False if they did not finish within `timeout` (the swap still happens when they do)."""
        done = self.scheduler.swap_engine(engine, self._conversations(engine), timeout)
        self.engine = engine
        self.metrics.engine = engine
        if self.http is not None:
            self.http.serve_model(engine.bundle.name)
        return done

    def bundle_info(self) -> dict[str, Any]:
        """The active bundle: name, sha256 of its bundle.json (names every file), A/B slot."""
        try:
            digest: str | None = ota.manifest_sha256(Path(self.bundle_path))
        except OSError:
            digest = None
        return {"name": self.engine.bundle.name, "sha256": digest, "slot": ota.slot_of(self.bundle_path)}

    def refresh_status(self) -> None:
        """Publish the status again (retained): after a swap, or an update's outcome."""
        if self.mqtt is not None:
            self.mqtt.set_status(self.status())

    def status(self) -> dict[str, Any]:
        """What the MQTT status message advertises."""
        return {
            "model": self.engine.bundle.name,
            "bundle": self.bundle_info(),
            "last_update": ota.last_outcome(self.ota_dir),
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "capabilities": {
                "stream": True,
                "sessions": True,
                "cancel": True,
                "max_context": self.engine.max_context,
                "max_payload": self.board.server.max_payload,
                "error_codes": list(protocol.ERROR_CODES),
                "keys": self.dispatcher.keys is not None,
                "fleet_group": self.board.mqtt.fleet_group or None,
                # JSON response formats need the 'structured' extra (llguidance) on this device.
                "response_format": ["text", *(("json_object", "json_schema") if _has_llguidance() else ())],
            },
        }

    def start(self) -> None:
        sock, mqtt_cfg, http_cfg = self.board.socket, self.board.mqtt, self.board.http
        grpc_cfg = self.board.grpc
        if not (sock.path or sock.tcp_port or mqtt_cfg.host or http_cfg.host or grpc_cfg.listen):
            raise ConfigError(
                "nothing to serve on: give a socket path, a TCP port, an MQTT broker, an HTTP or a "
                "gRPC address"
            )
        self.scheduler.start()
        try:
            if self.board.metrics.listen:
                where = parse_listen(self.board.metrics.listen, "metrics")
                self.metrics_server = MetricsServer(self.metrics, *where)
            if sock.path or sock.tcp_port:
                from edge_llm.transports.socket import SocketTransport

                self.socket = SocketTransport(
                    self.dispatcher, path=sock.path or None, tcp_port=sock.tcp_port or None
                )
                self.socket.start()
            if mqtt_cfg.host:
                from edge_llm.transports.mqtt import MqttTransport  # the only place paho is imported

                self.mqtt = MqttTransport(self.dispatcher, mqtt_cfg, self.status(), self.metrics.summary)
                if self.board.ota.trusted_key:  # its topics join the first subscription
                    from edge_llm.ota_mqtt import OtaReceiver

                    prefix = Path(self.board.ota.prefix or Path(self.bundle_path).parent).expanduser()
                    self.ota = OtaReceiver(self, self.mqtt, self.board.ota, prefix, self.ota_dir)
                    self.ota.start()
                self.mqtt.start()
            if http_cfg.host:
                from edge_llm.transports.http import HttpTransport  # extra "http": says so if missing

                self.http = HttpTransport(
                    self.dispatcher,
                    http_cfg,
                    self.engine.bundle.name,
                    ready=self.scheduler.accepting,
                    metrics=self.metrics,
                )
                self.http.start()
            if grpc_cfg.listen:
                from edge_llm.transports.grpc import GrpcTransport  # the only place grpcio is imported

                # Enough calls for everything the scheduler can hold; more are refused at once.
                calls = self.board.server.max_queue + self.scheduler.max_batch + 4
                where = parse_listen(grpc_cfg.listen, "grpc")
                self.grpc = GrpcTransport(self.dispatcher, *where, calls, tls=grpc_cfg.tls)
                self.grpc.start()
        except BaseException:
            self.stop()
            raise
        # The bundle is loaded (we were given the engine) and every transport accepts: ready.
        systemd.notify(f"READY=1\nSTATUS=serving {self.engine.bundle.name}")
        ota.boot_ok(self.ota_dir)  # came up: a switch before this start is confirmed
        interval = systemd.watchdog_interval()
        if interval is not None:
            self.watchdog = systemd.Watchdog(self.scheduler.alive, interval)
            self.watchdog.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        systemd.notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()
        # The scheduler first: it refuses new requests (`busy`, which clients retry) and lets the
        # running one finish within the grace period while the transports can still deliver it.
        self.scheduler.close(grace_s=self.board.server.shutdown_grace_s)
        if self.ota is not None:
            self.ota.stop()
        if self.socket is not None:
            self.socket.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.http is not None:
            self.http.stop()
        if self.grpc is not None:
            self.grpc.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.db.close()

    def _reload_for_signal(self) -> None:
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.reload()
        except Exception as exc:  # bad bundle: keep serving the old one, say why
            log.error("reload failed, still serving %s: %s", self.engine.bundle.name, exc)
        systemd.notify(f"READY=1\nSTATUS=serving {self.engine.bundle.name}")

    def run_until_signal(self, reload: threading.Event | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then stop cleanly; SIGHUP reloads the bundle. Main
        thread only. `reload`: an event the caller's own early SIGHUP handler sets."""
        done = threading.Event()
        reload = reload if reload is not None else threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %d: shutting down", signum)
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda _s, _f: reload.set())
        try:
            while not done.wait(0.5):
                if reload.is_set():
                    reload.clear()
                    self._reload_for_signal()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()


def state_file(board: BoardConfig, state_path: str | Path | None) -> Path:
    """The SQLite state file: `--state`, else `[server] state_dir`/state.sqlite."""
    if state_path is not None:
        return Path(state_path)
    return Path(board.server.state_dir).expanduser() / "state.sqlite"


def ota_dir(state: Path) -> Path:
    """OTA state beside the state file: partial transfer, start counter, last outcome."""
    return state.with_name(state.name.rsplit(".", 1)[0] + ".ota")


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_llguidance() -> bool:
    return importlib.util.find_spec("llguidance") is not None
