"""systemd service notifications (`Type=notify`, `WatchdogSec=`) without a dependency.

In: the environment systemd gives a service (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`)
and a liveness check. Out: `READY=1` / `STOPPING=1` / `STATUS=...` datagrams (`notify`) and, from
a `Watchdog` thread, `WATCHDOG=1` every half interval — but only while the check passes, so a
wedged engine stops the pings and systemd restarts the service after `WatchdogSec`.

The protocol is one datagram of newline-separated `KEY=value` lines to the Unix socket named in
`NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace), as sd_notify(3) describes; that
is all python-systemd's `daemon.notify` does, so the runtime keeps its four hard dependencies.
Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> str | None:
    where = env.get("NOTIFY_SOCKET", "")
    if where.startswith("@"):  # abstract namespace: a leading NUL byte on the wire
        return "\0" + where[1:]
    if where.startswith("/"):
        return where
    if where:  # e.g. vsock:CID:PORT (systemd ≥ 253, VMs): not used on boards
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket; systemd notifications are off", where)
    return None


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to systemd. False when not under a notify
    unit or the send failed — a notification must never take the service down."""
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait on a receiver that is not reading: a full queue drops this one message.
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("systemd notification %r failed: %s", state.split("\n", 1)[0], exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """`WatchdogSec` in seconds when systemd watches this process, else None."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):  # meant for another process (we were forked/exec'd)
        return None
    return int(usec) / 1e6


class Watchdog:
    """Pings `WATCHDOG=1` every `interval_s / 2` while `alive(interval_s)` holds.

    `alive` gets the interval so it can judge staleness against it (the scheduler's worker must
    have come round its loop within one interval). A failing check is logged once per episode;
    the pings resume if it recovers before systemd acts.
    """

    def __init__(
        self,
        alive: Callable[[float], bool],
        interval_s: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("watchdog interval must be > 0")
        self.alive = alive
        self.interval_s = interval_s
        self.env = env
        self.pings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-llm-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 1)

    def _run(self) -> None:
        healthy = True
        while not self._stop.wait(self.interval_s / 2):
            try:
                ok = self.alive(self.interval_s)
            except Exception:  # a broken check is a failed check, never a dead watchdog thread
                log.exception("watchdog liveness check raised")
                ok = False
            if ok:
                if notify("WATCHDOG=1", self.env):
                    self.pings += 1
                if not healthy:
                    log.warning("the serving loop is moving again; watchdog pings resumed")
                healthy = True
            elif healthy:
                log.error(
                    "the serving loop has not moved for %.0f s: watchdog pings stop, systemd restarts us",
                    self.interval_s,
                )
                healthy = False
