"""Swapping the bundle of a running server (SIGHUP / `systemctl reload` after an OTA switch)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_llm.board import BoardConfig, ServerConfig, SocketConfig
from edge_llm.engine import Engine
from edge_llm.errors import BundleError, ConfigError
from edge_llm.server import Server
from tests.conftest import gate_method


def _ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(60)
        client.connect(str(path))
        client.sendall(json.dumps(request).encode() + b"\n")
        with client.makefile("rb") as replies:
            while not (reply := json.loads(replies.readline())).get("done"):
                pass
    return reply


def test_reload_waits_for_running_requests_and_loses_none(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "edge.sock"
    board = BoardConfig(socket=SocketConfig(path=str(path)), server=ServerConfig(max_queue=32))
    server = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    server.start()
    old = server.engine
    # The old engine's decode steps wait at a gate: its requests are mid-answer during the reload.
    gate, stepping = gate_method(old, "step", monkeypatch)
    replies: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        reply = _ask(path, {"id": f"r{i}", "prompt": "The capital", "max_tokens": 8, "ignore_eos": True})
        with lock:
            replies.append(reply)

    try:
        running = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in running:
            t.start()
        assert stepping.wait(30)
        result: list[Engine] = []
        reload = threading.Thread(target=lambda: result.append(server.reload(timeout=60)))
        reload.start()
        reload.join(2.0)
        assert reload.is_alive()  # the swap waits for the running requests
        queued = [threading.Thread(target=client, args=(i,)) for i in range(3, 8)]
        for t in queued:
            t.start()
        gate.set()
        for t in [reload, *running, *queued]:
            t.join(60)
        assert result and server.engine is result[0] is server.scheduler.engine and result[0] is not old
        assert server.scheduler.stats["engine_swaps"] == 1
        assert sorted(r["id"] for r in replies) == sorted(f"r{i}" for i in range(8))
        errors = [r for r in replies if "error" in r]
        assert not errors, errors
        assert all(r["usage"]["completion_tokens"] == 8 for r in replies)
    finally:
        gate.set()
        server.stop()


def test_a_bad_bundle_leaves_the_old_one_serving(tiny_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "edge.sock"
    board = BoardConfig(socket=SocketConfig(path=str(path)))
    server = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    server.start()
    try:
        old = server.engine
        with pytest.raises(BundleError):
            server.reload(tmp_path / "not-a-bundle")
        assert server.engine is old and server.scheduler.engine is old
        assert "error" not in _ask(path, {"id": "after", "prompt": "Hi", "max_tokens": 2})
    finally:
        server.stop()


def test_sighup_reloads_a_running_serve(tiny_bundle: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "edge.sock"
    cmd = [sys.executable, "-m", "edge_llm.cli", "-v", "serve", "--bundle", str(tiny_bundle)]
    cmd += ["--socket", str(sock_path), "--state", str(tmp_path / "s.sqlite")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # "serving ..." once the socket is up
            if "edge-llm: serving" in line:
                break
        proc.send_signal(signal.SIGHUP)
        for line in proc.stderr:
            if "reloaded: now serving" in line:
                break
        assert "error" not in _ask(sock_path, {"id": "x", "prompt": "Hi", "max_tokens": 2})
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_newer_swap_replaces_a_waiting_one_and_releases_its_waiter(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload (no timeout) still waiting for a running request meets a second swap (an OTA
    switch): the second replaces it, the first's waiter is told so at once instead of blocking
    forever, and the server ends on the second engine."""
    path = tmp_path / "edge.sock"
    board = BoardConfig(socket=SocketConfig(path=str(path)))
    server = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    server.start()
    old = server.engine
    gate, stepping = gate_method(old, "step", monkeypatch)
    replies: list[dict[str, Any]] = []
    try:
        running = threading.Thread(
            target=lambda: replies.append(_ask(path, {"id": "r", "prompt": "Hi", "max_tokens": 4}))
        )
        running.start()
        assert stepping.wait(30)
        first: list[BaseException | bool] = []

        def reload_forever() -> None:
            try:
                first.append(server.swap(Engine.load(tiny_bundle)))
            except ConfigError as exc:
                first.append(exc)

        waiting = threading.Thread(target=reload_forever)
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive()  # held by the running request
        newer = Engine.load(tiny_bundle)
        second: list[bool] = []
        swapper = threading.Thread(target=lambda: second.append(server.swap(newer, timeout=30)))
        swapper.start()
        waiting.join(10)
        assert not waiting.is_alive() and isinstance(first[0], ConfigError)
        assert "replaced by a newer one" in str(first[0])
        gate.set()
        swapper.join(30)
        running.join(30)
        assert second == [True]
        assert server.engine is newer is server.scheduler.engine
        assert server.scheduler.stats["engine_swaps"] == 1
        assert replies and "error" not in replies[0]
    finally:
        gate.set()
        server.stop()
