"""Local socket transport: newline-delimited JSON over a Unix domain socket and/or 127.0.0.1 TCP.

In: lines from connected clients, each one protocol message (request or cancel). Out: reply
lines (chunks, then one final) on the connection that sent the request.

An asyncio loop on its own thread does all socket I/O. Replies come from the scheduler's worker
thread and are handed over with `call_soon_threadsafe`, so the worker never waits on a client;
a client that stops reading is disconnected once `max_buffer` bytes pile up for it.

The Unix socket is bound inside a fresh 0700 folder, set to 0600 and then renamed into place, so
there is no moment at which another user could connect to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import struct
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from edge_llm import protocol
from edge_llm.errors import ConfigError, TransportError
from edge_llm.transports.base import Dispatcher

log = logging.getLogger(__name__)

_READ = 64 * 1024


class _Connection:
    """One client connection; also its own reply `Address`."""

    transport = "socket"  # Unix and TCP alike (metrics label)

    def __init__(
        self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter, n: int, max_buffer: int
    ):
        self.loop = loop
        self.writer = writer
        self.key = self.client = f"socket:{n}"
        self.identity = peer_identity(writer.get_extra_info("socket"))
        self.max_buffer = max_buffer
        self.closed = False

    def send(self, reply: dict[str, Any]) -> None:
        if self.closed:
            return  # the client went away; its request still finishes (and is stored for a retry)
        data = protocol.encode(reply) + b"\n"
        try:
            self.loop.call_soon_threadsafe(self._write, data)
        except RuntimeError:  # loop closed during shutdown
            self.closed = True

    def _write(self, data: bytes) -> None:
        if self.closed or self.writer.is_closing():
            self.closed = True
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > self.max_buffer:
            log.warning("%s is not reading its replies; disconnecting it", self.key)
            self.closed = True
            self.writer.transport.abort()


class SocketTransport:
    def __init__(
        self,
        dispatcher: Dispatcher,
        path: str | Path | None = None,
        tcp_port: int | None = None,
        max_buffer: int = 4 * 1024 * 1024,
    ) -> None:
        """`path`: Unix socket to create; `tcp_port`: listen on 127.0.0.1 (0 = any free port)."""
        if path is None and tcp_port is None:
            raise ConfigError("socket transport: give a socket path, a TCP port, or both")
        self.dispatcher = dispatcher
        self.path = Path(path).expanduser() if path is not None else None
        self.tcp_port = tcp_port
        self.max_buffer = max_buffer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[_Connection] = set()
        self._ids = itertools.count(1)
        self._inode: int | None = None

    # -- lifecycle (caller's thread) --

    def start(self) -> None:
        ready: Future[None] = Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="edge-llm-socket", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=30)  # re-raises a bind failure here
        except BaseException:
            self._thread.join(timeout=10)  # the loop thread closes its loop and ends
            self._loop = self._thread = None
            raise

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        self._thread.join(timeout=10)
        self._remove_socket_file()
        self._loop = None

    # -- loop thread --

    def _run(self, ready: Future[None]) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._open())
        except BaseException as exc:
            ready.set_exception(exc)
            self._remove_socket_file()
            self._loop.close()
            return
        ready.set_result(None)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _open(self) -> None:
        if self.path is not None:
            sock = _bind_private_unix(self.path)
            self._inode = os.stat(self.path).st_ino
            self._servers.append(await asyncio.start_unix_server(self._serve, sock=sock))
            log.info("listening on unix:%s", self.path)
        if self.tcp_port is not None:
            try:
                server = await asyncio.start_server(self._serve, host="127.0.0.1", port=self.tcp_port)
            except OSError as exc:
                raise TransportError(f"cannot listen on 127.0.0.1:{self.tcp_port}: {exc}") from None
            self.tcp_port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
            log.info("listening on tcp:127.0.0.1:%d", self.tcp_port)

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.closed = True
            conn.writer.close()
        # Closing a connection ends its reader with EOF; cancelling its task instead would make
        # asyncio log the CancelledError from the stream protocol's done-callback.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
        assert self._loop is not None
        self._loop.call_soon(self._loop.stop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._loop is not None
        conn = _Connection(self._loop, writer, next(self._ids), self.max_buffer)
        self._conns.add(conn)

        def resolve(_reply_to: str | None) -> _Connection:
            return conn  # replies always go back on the connection

        limit = self.dispatcher.max_payload
        buf = bytearray()
        skipping = False  # inside a line already reported as too long
        try:
            while not conn.closed:
                data = await reader.read(_READ)
                if not data:
                    break
                buf += data
                while True:
                    end = buf.find(b"\n")
                    if end < 0:
                        if len(buf) > limit:
                            # Do not buffer an endless line: report once, then drop up to its newline.
                            if not skipping:
                                conn.send(
                                    protocol.error_reply(
                                        None, "bad_request", f"line longer than {limit} bytes"
                                    )
                                )
                            skipping = True
                            buf.clear()
                        break
                    line = bytes(buf[:end]).rstrip(b"\r")
                    del buf[: end + 1]
                    if skipping:
                        skipping = False
                        continue
                    if line.strip():
                        self._handle(line, resolve, conn.identity)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.closed = True
            self._conns.discard(conn)
            writer.close()

    def _handle(self, line: bytes, resolve: Any, identity: str) -> None:
        """One line to the dispatcher. It answers every message itself; should anything still
        escape (a bug), log it and keep the connection: other requests on it are in flight."""
        try:
            self.dispatcher.handle(line, resolve, identity=identity)
        except Exception:
            log.exception("failed to handle a message on a socket connection")

    def _remove_socket_file(self) -> None:
        """Remove our socket file (not one another server has since put at the same path)."""
        if self.path is None or self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._inode = None


def peer_identity(sock: Any) -> str:
    """Who is at the other end of a connection, as the request-ownership identity.

    A Unix socket peer is its user: `uid:N` from SO_PEERCRED (Linux), which the kernel fills in
    at connect time, so a client cannot claim another user's uid. TCP (127.0.0.1 only) carries no
    user: all TCP clients share the identity `tcp` — keep users apart with the Unix socket.
    """
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return "unix"
        _pid, uid, _gid = struct.unpack("3i", creds)
        return f"uid:{uid}"
    return "unix" if family == socket.AF_UNIX else "tcp"


def _bind_private_unix(path: Path) -> socket.socket:
    """A listening-ready Unix socket at `path` with mode 0600 from the start."""
    _clear_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=".edge-llm-", dir=path.parent))  # mode 0700
    tmp = private / "sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        # Listen before the path appears: a client that sees the file must not be refused in
        # the gap before asyncio's start_unix_server would call listen() (seen in serve_load).
        sock.listen(128)
        os.rename(tmp, path)  # atomic; clients connect by path, so the rename is invisible to them
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot create the socket {path}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()
    return sock


def _clear_stale(path: Path) -> None:
    """Remove a socket file left by a crashed server; refuse a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise TransportError(f"another server is already listening on {path}")
