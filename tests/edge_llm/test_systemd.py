"""sd_notify and the watchdog against a notify socket the test owns, plus the unit file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_llm import systemd
from edge_llm.board import BoardConfig, ServerConfig, SocketConfig
from edge_llm.engine import Engine
from edge_llm.server import Server
from tests.conftest import gate_method

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "configs" / "systemd" / "edge-llm.service"


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def _messages(sock: socket.socket, seconds: float) -> list[str]:
    """Every datagram that arrives within `seconds`."""
    out: list[str] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = _receiver(path)
    yield sock, path
    sock.close()


def test_notify_sends_one_datagram_to_a_path(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert systemd.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"edge-llm-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    try:
        assert systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_notify_outside_systemd_is_a_no_op(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:99"})
    # A socket that is gone: logged, never raised.
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})


def test_watchdog_interval_reads_usec_and_checks_the_pid() -> None:
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2500000"}) == 2.5
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(mine) == 1.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None


def test_ready_after_the_socket_accepts_and_watchdog_stops_while_the_engine_is_wedged(
    tiny_bundle: Path, tmp_path: Path, notify_socket: tuple[socket.socket, str], monkeypatch
) -> None:
    notify, notify_path = notify_socket
    interval = 1.0  # > the idle worker's 0.25 s beat
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(interval * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    sock_path = tmp_path / "edge.sock"
    engine = Engine.load(tiny_bundle)
    board = BoardConfig(socket=SocketConfig(path=str(sock_path)), server=ServerConfig(shutdown_grace_s=0))
    server = Server(engine, board, state_path=tmp_path / "state.sqlite")
    started = threading.Thread(target=server.start)
    started.start()
    try:
        ready = notify.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1"
        assert f"STATUS=serving {engine.bundle.name}" in ready
        # The moment READY arrives the socket already takes connections.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock_path))
        started.join(timeout=10)

        healthy = _messages(notify, 3 * interval)
        assert healthy.count("WATCHDOG=1") >= 3, healthy

        # Wedge the engine: the next prefill blocks until released.
        release, entered = gate_method(engine, "start_all", monkeypatch)
        request = {"id": "stuck", "prompt": "The capital of France is", "max_tokens": 3}
        client.sendall(json.dumps(request).encode() + b"\n")
        assert entered.wait(10)
        time.sleep(interval * 1.5)  # the last ping of the moving loop may still be in flight
        _messages(notify, 0.01)
        wedged_pings = _messages(notify, 3 * interval)
        assert "WATCHDOG=1" not in wedged_pings, wedged_pings

        release.set()  # the engine moves again: the pings resume and the request is answered
        resumed = _messages(notify, 3 * interval)
        assert resumed.count("WATCHDOG=1") >= 2, resumed
        client.settimeout(10)
        with client.makefile("rb") as replies:
            while not (reply := json.loads(replies.readline())).get("done"):
                pass
        assert reply["id"] == "stuck" and "error" not in reply, reply
        client.close()
    finally:
        server.stop()
    assert "STOPPING=1" in _messages(notify, 1.0)


def test_scheduler_alive_goes_stale_without_a_worker(tiny_bundle: Path) -> None:
    from edge_llm.scheduler import Scheduler

    scheduler = Scheduler(Engine.load(tiny_bundle))
    assert not scheduler.alive(60)  # not started: no worker
    scheduler.start()
    try:
        time.sleep(0.1)
        assert scheduler.alive(5)
    finally:
        scheduler.close(grace_s=0)
    assert not scheduler.alive(60)


def test_unit_has_the_service_settings() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=edge-llm",
        "StateDirectory=edge-llm",
        "RuntimeDirectory=edge-llm",
        "ProtectSystem=strict",
        "ReadWritePaths=/opt/edge-llm/ota",  # OTA writes its A/B slots there (install.sh owns it to the user)
        "ProtectHome=true",
        "PrivateTmp=true",
        "NoNewPrivileges=true",
        "Environment=ORT_DISABLE_TELEMETRY=1",
        "--socket /run/edge-llm/edge-llm.sock",
    ):
        assert line in text, line


def test_reload_needs_only_a_shell() -> None:
    # boards/qemu-aarch64.sh found it: Debian minbase has no /bin/kill, so verify failed there
    reload = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecReload=")]
    assert reload == ["ExecReload=/bin/sh -c 'kill -HUP \"$MAINPID\"'"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point the prefix at a stand-in.
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / "edge-llm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "edge-llm.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-llm", str(tmp_path)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("preset", [None, "0"])
def test_ort_telemetry_off_unless_the_user_says(preset: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    if preset is not None:
        env["ORT_DISABLE_TELEMETRY"] = preset
    code = "import os, edge_llm.engine; print(os.environ.get('ORT_DISABLE_TELEMETRY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (preset or "1")


def test_serve_command_notifies_ready_then_stopping(
    tiny_bundle: Path, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """`edge-llm serve` as systemd starts it: READY=1 once the socket answers, STOPPING=1 on SIGTERM."""
    notify, notify_path = notify_socket
    notify.settimeout(60)
    sock_path = tmp_path / "edge.sock"
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    cmd = [
        sys.executable,
        "-m",
        "edge_llm.cli",
        "serve",
        "--bundle",
        str(tiny_bundle),
        "--socket",
        str(sock_path),
    ]
    proc = subprocess.Popen([*cmd, "--state", str(tmp_path / "s.sqlite")], env=env, stderr=subprocess.PIPE)
    try:
        assert notify.recv(4096).decode().startswith("READY=1\n")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(sock_path))
            client.sendall(json.dumps({"id": "r1", "prompt": "Hi", "max_tokens": 2}).encode() + b"\n")
            client.settimeout(30)
            with client.makefile("rb") as replies:
                while not (reply := json.loads(replies.readline())).get("done"):
                    pass
        assert reply["id"] == "r1" and "error" not in reply, reply
        assert "WATCHDOG=1" in _messages(notify, 1.5)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert "STOPPING=1" in _messages(notify, 1.0)
