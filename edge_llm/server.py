"""Wiring for `edge-llm serve`: board config + engine + scheduler + sessions + transports.

In: a loaded `Engine` and a `BoardConfig` (its `[server]`, `[sessions]`, `[socket]`, `[mqtt]`
sections, already merged with command-line overrides). Out: a running `Server` — one scheduler
worker owning the engine, the SQLite state database, and whichever transports are configured —
that `stop()` (or SIGINT/SIGTERM in `run_until_signal`) shuts down cleanly: the scheduler first
(queued requests answered `busy`, the running one given a grace period), then the transports
(MQTT status `offline`, socket file removed).

Under systemd (`Type=notify`) `start()` sends `READY=1` once the transports are up and, when the
unit sets `WatchdogSec`, keeps a watchdog that pings only while the scheduler's worker moves
(`edge_llm.systemd`): a wedged engine gets the service restarted.

SIGHUP (`systemctl reload`) reloads the bundle from its path — after `edge-llm update` switched
the A/B slot link — without a restart: the new engine is loaded and probed beside the old one,
then swapped in between steps; running requests finish on the old engine, queued ones run on the
new one. A bundle that fails to load or answer leaves the old one serving.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edge_llm import __version__, protocol, systemd
from edge_llm.board import BoardConfig
from edge_llm.engine import Engine
from edge_llm.errors import ConfigError
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
        path = Path(srv.state_dir).expanduser() / "state.sqlite" if own else Path(state_path)
        self.db = StateDB(path, max_finals=srv.max_finals, private_dir=own)
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
        self.dispatcher = Dispatcher(self.scheduler, max_payload=srv.max_payload)
        self.socket: Any = None
        self.mqtt: Any = None
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

        path = bundle if bundle is not None else self.engine.bundle.path
        engine = Engine.load(path, self.engine.options)
        probe = engine.encode_request(messages=[{"role": "user", "content": "Hello"}])
        engine.complete(probe, SamplingParams(max_tokens=2, ignore_eos=True), Slot())
        if not self.scheduler.swap_engine(engine, self._conversations(engine), timeout):
            raise ConfigError(f"reload: the running requests did not finish within {timeout} s")
        self.engine = engine
        log.info("reloaded: now serving %s from %s", engine.bundle.name, path)
        return engine

    def status(self) -> dict[str, Any]:
        """What the MQTT status message advertises."""
        return {
            "model": self.engine.bundle.name,
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "capabilities": {
                "stream": True,
                "sessions": True,
                "cancel": True,
                "max_context": self.engine.max_context,
                "max_payload": self.board.server.max_payload,
                "error_codes": list(protocol.ERROR_CODES),
                "fleet_group": self.board.mqtt.fleet_group or None,
            },
        }

    def start(self) -> None:
        sock, mqtt_cfg = self.board.socket, self.board.mqtt
        if not sock.path and not sock.tcp_port and not mqtt_cfg.host:
            raise ConfigError("nothing to serve on: give a socket path, a TCP port or an MQTT broker")
        self.scheduler.start()
        try:
            if sock.path or sock.tcp_port:
                from edge_llm.transports.socket import SocketTransport

                self.socket = SocketTransport(
                    self.dispatcher, path=sock.path or None, tcp_port=sock.tcp_port or None
                )
                self.socket.start()
            if mqtt_cfg.host:
                from edge_llm.transports.mqtt import MqttTransport  # the only place paho is imported

                self.mqtt = MqttTransport(self.dispatcher, mqtt_cfg, self.status())
                self.mqtt.start()
        except BaseException:
            self.stop()
            raise
        # The bundle is loaded (we were given the engine) and every transport accepts: ready.
        systemd.notify(f"READY=1\nSTATUS=serving {self.engine.bundle.name}")
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
        if self.socket is not None:
            self.socket.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
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
