"""The local socket transport, end to end: a real server on a real tiny bundle, raw JSON lines."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edge_llm.board import BoardConfig, ServerConfig, SocketConfig
from edge_llm.engine import Engine
from edge_llm.errors import ConfigError, TransportError
from edge_llm.protocol import Request
from edge_llm.scheduler import Event, Scheduler
from edge_llm.server import Server
from edge_llm.transports.socket import peer_identity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from mosquitto import free_port


def start_server(bundle: Path, folder: Path, tcp: bool = False, **server: Any) -> Server:
    board = BoardConfig(
        socket=SocketConfig(path=str(folder / "edge.sock"), tcp_port=free_port() if tcp else 0),
        server=ServerConfig(**{"max_payload": 4096, **server}),
    )
    s = Server(Engine.load(bundle), board, state_path=folder / "state.sqlite")
    s.start()
    return s


@pytest.fixture
def server(tiny_bundle: Path, tmp_path: Path) -> Iterator[Server]:
    s = start_server(tiny_bundle, tmp_path)
    yield s
    s.stop()


class Line:
    """A raw protocol client: JSON lines over one connection."""

    def __init__(self, where: str | int) -> None:
        if isinstance(where, int):
            self.sock = socket.create_connection(("127.0.0.1", where), timeout=30)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(30)
            self.sock.connect(where)
        self.file = self.sock.makefile("rb")

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.sock.sendall(data + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "server closed the connection"
        return json.loads(line)

    def exchange(self, message: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        self.send(message)
        chunks = []
        while True:
            reply = self.recv()
            if reply.get("done"):
                return chunks, reply
            chunks.append(reply)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def ask(rid: str, **kw: Any) -> dict[str, Any]:
    return {"id": rid, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, **kw}


def hold_worker(scheduler: Scheduler) -> threading.Event:
    """Keep the worker busy (its sink blocks) until the returned event is set."""
    release, started = threading.Event(), threading.Event()

    def sink(_event: Event) -> None:
        started.set()
        release.wait(30)

    hold = Request(id=f"hold-{uuid.uuid4().hex}", prompt="x", stream=True, max_tokens=3, ignore_eos=True)
    scheduler.submit(hold, sink, client="holder")
    assert started.wait(30)
    return release


def test_round_trip_streams_chunks_in_order(server: Server) -> None:
    c = Line(str(server.socket.path))
    chunks, final = c.exchange(ask("r1", stream=True, max_tokens=20, ignore_eos=True))
    assert [ch["seq"] for ch in chunks] == list(range(len(chunks))) and len(chunks) > 1
    assert all(ch["id"] == "r1" and set(ch) == {"id", "seq", "delta"} for ch in chunks)
    assert "".join(ch["delta"] for ch in chunks) == final["text"]
    assert final["done"] is True and final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 20
    chunks, final = c.exchange(ask("r2"))  # not streamed: the final only
    assert chunks == [] and final["id"] == "r2" and "text" in final
    c.close()


def test_socket_file_is_0600_and_removed_on_stop(tiny_bundle: Path, tmp_path: Path) -> None:
    s = start_server(tiny_bundle, tmp_path)
    path = s.socket.path
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".edge-llm-")] == []
    s.stop()
    assert not path.exists()


def test_tcp_listens_on_loopback(tiny_bundle: Path, tmp_path: Path) -> None:
    s = start_server(tiny_bundle, tmp_path, tcp=True)
    try:
        port = s.socket.tcp_port
        c = Line(port)
        assert c.sock.getpeername()[0] == "127.0.0.1"
        _, final = c.exchange(ask("t1"))
        assert final["finish_reason"] in ("stop", "length")
        c.close()
    finally:
        s.stop()


def test_each_bad_input_gets_its_error_and_the_server_keeps_serving(server: Server) -> None:
    c = Line(str(server.socket.path))
    cases: list[tuple[bytes, str | None, str]] = [
        (b"this is not json", None, "not JSON"),
        (b'{"id": "u", "prompt": "\xff\xfe"}', None, "UTF-8"),
        (b'{"id": "big", "prompt": "' + b"x" * 5000 + b'"}', None, "limit is 4096"),
        (b"y" * 100_000, None, "4096"),  # an endless line is dropped, not buffered
        (json.dumps(ask("unk", colour="red")).encode(), "unk", "unknown field(s): colour"),
        (json.dumps(ask("typ", max_tokens="8")).encode(), "typ", "max_tokens must be an integer"),
        (json.dumps({"prompt": "no id"}).encode(), None, "id is required"),
        (json.dumps(ask("rng", temperature=500)).encode(), "rng", "temperature"),
        (json.dumps(ask("long", max_tokens=100_000)).encode(), "long", "exceeds the context window"),
        (b"[]", None, "JSON object"),
    ]
    for payload, rid, needle in cases:
        c.send(payload)
        reply = c.recv()
        assert reply["done"] is True and reply["id"] == rid, reply
        code = "too_long" if rid == "long" else "bad_request"
        assert reply["error"]["code"] == code and needle in reply["error"]["message"], reply
    c.send(b"\n\r\n")  # blank lines are ignored
    _, final = c.exchange(ask("fine"))
    assert final["id"] == "fine" and "text" in final
    c.close()
    # A client that disconnects mid-request does not take the server down either.
    d = Line(str(server.socket.path))
    d.send(ask("gone", stream=True, max_tokens=50, ignore_eos=True))
    d.close()
    e = Line(str(server.socket.path))
    _, final = e.exchange(ask("after"))
    assert final["id"] == "after" and "text" in final
    e.close()


def test_twenty_concurrent_clients_are_all_answered(tiny_bundle: Path, tmp_path: Path) -> None:
    s = start_server(tiny_bundle, tmp_path, max_queue=32)  # room for all: none is told busy
    results: dict[int, tuple[list[dict[str, Any]], dict[str, Any]]] = {}

    def one(i: int) -> None:
        c = Line(str(s.socket.path))
        results[i] = c.exchange(ask(f"c{i}", stream=True, max_tokens=6, ignore_eos=True))
        c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        s.stop()
    assert sorted(results) == list(range(20))
    for i, (chunks, final) in results.items():
        assert final["id"] == f"c{i}" and final["usage"]["completion_tokens"] == 6, final
        assert "".join(ch["delta"] for ch in chunks) == final["text"]
    assert s.scheduler.stats["runs"] == 20


def test_same_request_id_twice_is_generated_once(server: Server) -> None:
    a, b = Line(str(server.socket.path)), Line(str(server.socket.path))
    _, first = a.exchange(ask("once", max_tokens=12))
    chunks, second = b.exchange(ask("once", max_tokens=12, stream=True))
    assert second == first and chunks == []  # the stored final, sent again
    assert server.scheduler.stats["runs"] == 1 and server.scheduler.stats["replayed"] == 1
    a.close()
    b.close()


def test_busy_when_queue_full_or_client_over_its_limit(tiny_bundle: Path, tmp_path: Path) -> None:
    s = start_server(tiny_bundle, tmp_path, max_queue=3, max_inflight_per_client=2)
    try:
        release = hold_worker(s.scheduler)
        c, d, e = (Line(str(s.socket.path)) for _ in range(3))
        c.send(ask("b1"))
        c.send(ask("b2"))
        c.send(ask("b3"))  # this connection already has 2 in flight
        assert c.recv() == {
            "id": "b3",
            "done": True,
            "error": {"code": "busy", "message": "this client already has 2 requests in flight"},
        }
        d.send(ask("b4"))  # takes the last place in the queue
        e.send(ask("b5"))
        reply = e.recv()
        assert reply["id"] == "b5" and reply["error"]["code"] == "busy"
        assert "queue is full" in reply["error"]["message"]
        release.set()
        assert {c.recv()["id"], c.recv()["id"], d.recv()["id"]} == {"b1", "b2", "b4"}
        _, final = e.exchange(ask("b5"))  # the retry, same id, is served
        assert "text" in final
        for x in (c, d, e):
            x.close()
    finally:
        s.stop()


def test_cancel_a_streaming_request(server: Server) -> None:
    c = Line(str(server.socket.path))
    c.send(ask("long", stream=True, max_tokens=200, ignore_eos=True))
    assert c.recv()["seq"] == 0
    c.send({"cancel": "long"})
    while "done" not in (reply := c.recv()):
        pass
    assert reply["error"]["code"] == "cancelled"
    c.close()


def test_stale_socket_is_replaced_and_a_live_one_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "edge.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a crashed server's leftover: nobody listens
    s = start_server(tiny_bundle, tmp_path)
    try:
        with pytest.raises(TransportError, match="already listening"):
            start_server(tiny_bundle, tmp_path)
        _, final = Line(str(path)).exchange(ask("x"))
        assert "text" in final
    finally:
        s.stop()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        start_server(tiny_bundle, tmp_path)
    assert path.read_text() == "not a socket"


def test_nothing_to_serve_is_a_config_error(tiny_bundle: Path, tmp_path: Path) -> None:
    board = replace(BoardConfig(), socket=SocketConfig())
    with pytest.raises(ConfigError, match="nothing to serve"):
        Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "s.sqlite").start()


def test_peer_identity_is_the_unix_peer_uid() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_identity(a) == peer_identity(b) == f"uid:{os.getuid()}"
    with socket.socket() as tcp:
        assert peer_identity(tcp) == "tcp"  # TCP names no user: one shared identity


def test_a_request_id_is_refused_to_another_identity(tiny_bundle: Path, tmp_path: Path) -> None:
    """The Unix client (its uid) and a TCP client (the shared `tcp` identity) are two identities:
    neither receives nor cancels the other's request by sending its id."""
    s = start_server(tiny_bundle, tmp_path, tcp=True)
    try:
        unix, tcp = Line(str(s.socket.path)), Line(s.socket.tcp_port)
        _, first = unix.exchange(ask("pin", max_tokens=12))
        assert "text" in first
        _, stolen = tcp.exchange(ask("pin", max_tokens=12))
        assert stolen["id"] == "pin" and stolen["error"]["code"] == "bad_request"
        assert "id in use" in stolen["error"]["message"] and "text" not in stolen
        _, again = unix.exchange(ask("pin", max_tokens=12))
        assert again == first  # the owner still gets its stored final
        # A cancel from the other identity leaves a running request alone.
        release = hold_worker(s.scheduler)
        unix.send(ask("run", max_tokens=8, ignore_eos=True))
        tcp.send({"cancel": "run"})
        tcp.send(ask("probe", max_tokens=1))  # handled after the cancel (same connection, in order)
        release.set()
        assert tcp.recv()["id"] == "probe"
        final = unix.recv()
        assert final["id"] == "run" and final["finish_reason"] == "length"
        assert s.scheduler.stats["cancel_refused"] == 1 and s.scheduler.stats["id_in_use"] == 1
        unix.close()
        tcp.close()
    finally:
        s.stop()


def test_hostile_messages_never_close_the_connection(server: Server) -> None:
    """Issue 11's repros: each gets one bad_request, a request already streaming on the same
    connection is untouched, and a valid request sent after each is answered."""
    big = "9" * 400
    hostile = [
        (b"[" * 1000 + b"]" * 1000, None),
        (b'{"id":"h1","prompt":"x","temperature":' + big.encode() + b"}", "h1"),
        (b'{"id":"h2","prompt":"x","top_p":' + big.encode() + b"}", "h2"),
        (b'{"id":"h3","prompt":"x","deadline_ms":1' + b"0" * 312 + b"}", "h3"),
        (b'{"id":"\\ud800","prompt":"x"}', None),
        (b'{"id":"h4","prompt":"x","\\ud800":1}', "h4"),
        (b'{"id":"h5","prompt":"x\\udfff"}', "h5"),
        (b'{"id":"h6","messages":[{"role":"user","content":"\\ud800"}]}', "h6"),
        (b'{"id":"h7","messages":[{"role":"user","content":"a"}],"session":"\\ud800"}', "h7"),
        (b'{"id":"h8","prompt":"x","temperature":NaN}', "h8"),
    ]
    c = Line(str(server.socket.path))
    c.send(ask("long-running", stream=True, max_tokens=40, ignore_eos=True))
    finals: dict[str, dict[str, Any]] = {}
    for i, (payload, rid) in enumerate(hostile):
        c.send(payload)
        c.send(ask(f"ok-{i}", temperature=1e-40))  # tiny temperature: greedy, not "internal"
        want = {rid, f"ok-{i}"}
        while not want <= finals.keys():  # chunks of long-running interleave; collect finals
            reply = c.recv()
            if reply.get("done"):
                assert reply["id"] not in finals, f"two finals for {reply['id']}"
                finals[reply["id"]] = reply
        assert finals[rid]["error"]["code"] == "bad_request", finals[rid]
        assert "text" in finals[f"ok-{i}"], finals[f"ok-{i}"]
        finals.pop(rid)  # the next null-id error must be seen afresh
    while "long-running" not in finals:
        reply = c.recv()
        if reply.get("done"):
            finals[reply["id"]] = reply
    assert finals["long-running"]["finish_reason"] == "length"
    c.close()
