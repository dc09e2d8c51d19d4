"""Client side of the local socket transport (Unix socket or 127.0.0.1 TCP), thread-based.

One connection carries many requests; a reader thread routes reply lines by request id. The
connection is (re)opened lazily by `send`; when it drops, every waiting request is told (`LOST`)
and its exchange reconnects with backoff and sends again with the same id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_llm import protocol
from edge_llm.client._core import LOST
from edge_llm.errors import TransportError
from edge_llm.protocol import Request

log = logging.getLogger(__name__)


class SocketConnection:
    def __init__(
        self,
        path: str | Path | None = None,
        *,
        tcp_port: int | None = None,
        host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
    ) -> None:
        if (path is None) == (tcp_port is None):
            raise ValueError("give exactly one of a socket path or a TCP port")
        self.path = str(Path(path).expanduser()) if path is not None else None
        self.address = (host, tcp_port)
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # guards _sock and writes
        self._routes: dict[str, Callable[[Any], None]] = {}
        self._routes_lock = threading.Lock()
        self._closed = False

    def describe(self) -> str:
        return f"unix:{self.path}" if self.path else f"tcp:{self.address[0]}:{self.address[1]}"

    def connect(self) -> None:
        with self._lock:
            self._connect_locked()

    def _connect_locked(self) -> socket.socket:
        if self._closed:
            raise TransportError("the client is closed")
        if self._sock is not None:
            return self._sock
        family = socket.AF_UNIX if self.path else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path or self.address)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot connect to {self.describe()}: {exc}") from None
        sock.settimeout(None)
        self._sock = sock
        threading.Thread(target=self._read, args=(sock,), name="edge-llm-client-read", daemon=True).start()
        return sock

    def register(self, request_id: str, put: Callable[[Any], None]) -> None:
        with self._routes_lock:
            self._routes[request_id] = put

    def unregister(self, request_id: str) -> None:
        with self._routes_lock:
            self._routes.pop(request_id, None)

    def send(self, request: Request) -> None:
        self._write(protocol.encode(request.to_dict()))

    def send_cancel(self, request_id: str) -> None:
        self._write(protocol.encode({"cancel": request_id}))

    def _write(self, data: bytes) -> None:
        with self._lock:
            sock = self._connect_locked()
            try:
                sock.sendall(data + b"\n")
            except OSError as exc:
                self._drop_locked(sock)
                raise TransportError(f"lost {self.describe()}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._drop_locked(self._sock)

    def _drop_locked(self, sock: socket.socket) -> None:
        if self._sock is sock:
            self._sock = None
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _read(self, sock: socket.socket) -> None:
        buf = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._route(line)
        except OSError:
            pass
        with self._lock:
            if self._sock is sock:
                self._drop_locked(sock)
        if not self._closed:
            with self._routes_lock:
                routes = list(self._routes.values())
            for put in routes:
                put(LOST)

    def _route(self, line: bytes) -> None:
        try:
            reply = json.loads(line)
        except ValueError:
            log.warning("ignored a reply that is not JSON: %.80r", line)
            return
        if not isinstance(reply, dict):
            return
        with self._routes_lock:
            if reply.get("id") is None:
                # The server could not read a request's id (it was too big or broken): every
                # waiting request may be the one, and all of them were sent by this client.
                targets = list(self._routes.values())
            else:
                target = self._routes.get(str(reply["id"]))
                targets = [target] if target is not None else []
        for put in targets:
            put(reply)
