"""API keys and per-key limits (edge_llm/keys.py): the CLI, the gate's buckets, the board section,
and the one-final-per-request rule through a real socket server."""

from __future__ import annotations

import io
import json
import os
import queue
import stat
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from edge_llm import keys as keys_mod
from edge_llm.board import BoardConfig, KeysConfig, MqttConfig, ServerConfig, SocketConfig, load_board
from edge_llm.cli import main
from edge_llm.engine import Engine
from edge_llm.errors import ConfigError, RateLimitedError, UnauthorizedError
from edge_llm.keys import KeyGate, Limits, add_key, load_entries, revoke_key
from edge_llm.server import Server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_socket import Line  # a raw JSON-lines client


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def test_cli_add_list_revoke(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    rc, out = cli("keys", "add", "--keys-file", str(path), "--name", "app", "--requests-per-minute", "5",
                  "--tokens-per-minute", "1000", "--max-concurrent", "2")  # fmt: skip
    assert rc == 0
    key = out.strip().splitlines()[-1]
    assert key.startswith(keys_mod.KEY_PREFIX) and len(key) > 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert key not in text and keys_mod.hash_key(key) in text  # only the hash is stored
    (entry,) = load_entries(path)
    assert entry.name == "app" and entry.limits == Limits(5, 1000, 2)
    rc, out = cli("keys", "list", "--keys-file", str(path))
    assert rc == 0 and "app" in out and key not in out
    with pytest.raises(ConfigError, match="exists"):
        add_key(path, "app", Limits())
    with pytest.raises(ConfigError, match="key name"):
        add_key(path, "bad name", Limits())
    assert cli("keys", "revoke", "--keys-file", str(path), "--name", "nobody")[0] == 1
    assert cli("keys", "revoke", "--keys-file", str(path), "--name", "app")[0] == 0
    assert load_entries(path) == []


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gate_with(tmp_path: Path, clock: Clock, **limits: int) -> tuple[KeyGate, str]:
    key = add_key(tmp_path / "keys.json", "app", Limits(**limits))
    return KeyGate(tmp_path / "keys.json", clock=clock), key


def test_requests_per_minute_bucket(tmp_path: Path) -> None:
    clock = Clock()
    gate, key = gate_with(tmp_path, clock, requests_per_minute=2)
    gate.admit("http", key).release()
    gate.admit("http", key).release()
    with pytest.raises(RateLimitedError) as err:
        gate.admit("http", key)
    assert err.value.retry_after_s == pytest.approx(30.0)  # 2 per minute: one every 30 s
    clock.t += 29.0
    with pytest.raises(RateLimitedError) as err:
        gate.admit("http", key)
    assert err.value.retry_after_s == pytest.approx(1.0)
    clock.t += 1.0
    gate.admit("http", key).release()  # a refused request took nothing: this one fits


def test_tokens_per_minute_charged_at_the_end(tmp_path: Path) -> None:
    clock = Clock()
    gate, key = gate_with(tmp_path, clock, tokens_per_minute=120)
    grant = gate.admit("http", key)
    grant.release(tokens=180)  # the bucket held 120: now -60
    grant.release(tokens=180)  # released once only
    with pytest.raises(RateLimitedError, match="tokens_per_minute") as err:
        gate.admit("http", key)
    assert err.value.retry_after_s == pytest.approx(30.0, abs=0.01)  # 60 tokens at 2 per second
    clock.t += 31
    gate.admit("http", key).release(tokens=1)


def test_max_concurrent(tmp_path: Path) -> None:
    gate, key = gate_with(tmp_path, Clock(), max_concurrent=1)
    first = gate.admit("http", key)
    with pytest.raises(RateLimitedError, match="in flight"):
        gate.admit("http", key)
    first.release()
    gate.admit("http", key)


def test_who_maps_to_which_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = add_key(path, "alice", Limits())
    add_key(path, "svc", Limits())
    gate = KeyGate(path, {"1000": "svc"})
    assert gate.authenticate("anything", key) == "alice"  # a key wins over the transport's identity
    assert gate.authenticate("uid:1000", None) == "svc"
    assert gate.authenticate("mqtt-user:alice", None) == "alice"  # broker username = key name
    for who in ("uid:1001", "tcp", "http", "mqtt-user:mallory", "mqtt-reply:replies/x"):
        with pytest.raises(UnauthorizedError, match="API key is required"):
            gate.authenticate(who, None)
    with pytest.raises(UnauthorizedError, match="unknown or revoked"):
        gate.authenticate("http", key + "x")
    with pytest.raises(ConfigError, match="not in the keys file"):
        KeyGate(path, {"1000": "nobody"})


def test_running_gate_sees_added_and_revoked_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_mod, "_RELOAD_EVERY_S", 0.0)
    path = tmp_path / "keys.json"
    first = add_key(path, "first", Limits())
    gate = KeyGate(path)
    later = add_key(path, "later", Limits())
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 10**9))  # a distinct mtime on coarse clocks
    assert gate.authenticate("http", later) == "later"
    revoke_key(path, "first")
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(UnauthorizedError):
        gate.authenticate("http", first)


def test_board_sections_reject_unknown_keys(tmp_path: Path) -> None:
    board = tmp_path / "b.toml"
    board.write_text(
        '[keys]\nfile = "k.json"\n[keys.uids]\n"1000" = "svc"\n[http]\nhost = "0.0.0.0"\nport = 9000\n'
    )
    cfg = load_board(board)
    assert cfg.keys.uids == {"1000": "svc"} and cfg.http.port == 9000
    for bad in ('[http]\nhots = "x"\n', '[http.tls]\ncert = "c.pem"\n', '[keys]\nfile = "k"\nuid = 1\n',
                '[keys]\n[keys.uids]\n"1000" = "svc"\n'):  # fmt: skip
        board.write_text(bad)
        with pytest.raises(ConfigError):
            load_board(board)


def test_socket_every_request_gets_exactly_one_final(tiny_bundle: Path, tmp_path: Path) -> None:
    """Over its requests-per-minute, a key's requests are refused `rate_limited` with a
    retry-after — one final each, never dropped, never doubled. The local user's uid is mapped
    to a key by the board profile, so it needs none."""
    keys_file = tmp_path / "keys.json"
    key = add_key(keys_file, "app", Limits(requests_per_minute=3))
    add_key(keys_file, "local", Limits())
    board = BoardConfig(
        socket=SocketConfig(path=str(tmp_path / "edge.sock")),
        server=ServerConfig(max_inflight_per_client=16),
        keys=KeysConfig(file=str(keys_file), uids={str(os.getuid()): "local"}),
    )
    server = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    server.start()
    line = Line(str(tmp_path / "edge.sock"))
    try:
        n = 6
        for i in range(n):
            line.send({"id": f"r{i}", "prompt": "Hello", "max_tokens": 3, "key": key})
        line.send({"id": "wrong", "prompt": "Hello", "max_tokens": 3, "key": "ekl-nope"})
        line.send({"id": "mine", "prompt": "Hello", "max_tokens": 3})  # no key: the uid's
        finals: dict[str, list[dict]] = {}
        while sum(len(v) for v in finals.values()) < n + 2:
            reply = line.recv()
            assert reply.get("done"), reply
            finals.setdefault(reply["id"], []).append(reply)
        line.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):  # nothing else comes: no second final for anyone
            line.recv()
    finally:
        line.close()
        server.stop()
    assert sorted(finals) == sorted([*(f"r{i}" for i in range(n)), "wrong", "mine"])
    assert all(len(v) == 1 for v in finals.values())
    served = [i for i in finals if i.startswith("r") and "text" in finals[i][0]]
    limited = [finals[i][0]["error"] for i in finals if i.startswith("r") and "error" in finals[i][0]]
    assert len(served) == 3 and len(limited) == 3
    assert all(e["code"] == "rate_limited" and e["retry_after_s"] > 0 for e in limited)
    assert finals["wrong"][0]["error"]["code"] == "unauthorized"
    assert "text" in finals["mine"][0]
    json.dumps(finals)  # every reply is plain JSON


def test_codes_key_field_and_base_install() -> None:
    """The new codes are in the closed set (rate_limited with its retry-after); a request's key
    is parsed but never printed; the runtime without the http extra imports none of it."""
    import subprocess

    from edge_llm import protocol
    from edge_llm.config import tomllib  # tomli on Python 3.10

    assert protocol.error_code(UnauthorizedError("x")) == "unauthorized"
    reply = protocol.exception_reply("a", RateLimitedError("slow down", 2.5))
    assert reply["error"] == {"code": "rate_limited", "message": "slow down", "retry_after_s": 2.5}
    assert "rate_limited" in protocol.RETRYABLE_CODES and "unauthorized" not in protocol.RETRYABLE_CODES
    request = protocol.parse_message(b'{"id": "a", "prompt": "p", "key": "ekl-secret"}')
    assert request.key == "ekl-secret" and "ekl-secret" not in repr(request)
    with pytest.raises(protocol.ProtocolError, match="key"):
        protocol.parse_message(b'{"id": "a", "prompt": "p", "key": 5}')

    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    hard = sorted(d.split(">")[0] for d in deps if "python_version" not in d)  # tomli: 3.10 only
    assert hard == ["numpy", "onnxruntime", "paho-mqtt", "tokenizers"]
    code = (
        "import sys, edge_llm.server, edge_llm.keys, edge_llm.transports.socket, edge_llm.cli as c\n"
        "c.build_parser()\n"
        "extra = ('uvicorn', 'starlette', 'anyio', 'h11')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in extra)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mqtt_requests_carry_their_key(tiny_bundle: Path, tmp_path: Path) -> None:
    """The same gate on MQTT: the request's key field, its limits, one final per request (raw
    paho and the SDK, which raises the code's error)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mosquitto import Broker
    from test_mqtt import DEVICE, GENERATE, Raw, client

    keys_file = tmp_path / "keys.json"
    key = add_key(keys_file, "app", Limits(requests_per_minute=2))
    broker = Broker(tmp_path / "broker").start()
    board = BoardConfig(
        mqtt=MqttConfig(host=broker.host, port=broker.port, device=DEVICE),
        keys=KeysConfig(file=str(keys_file)),
    )
    server = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    server.start()
    raw = Raw(broker)
    try:
        raw.subscribe("keys/replies")
        for i in range(4):
            request = {"id": f"m{i}", "prompt": "Hello", "max_tokens": 2, "key": key}
            raw.publish(GENERATE, json.dumps(request).encode(), "keys/replies")
        raw.publish(GENERATE, json.dumps({"id": "nokey", "prompt": "Hi"}).encode(), "keys/replies")
        finals: dict[str, list[dict]] = {}
        for _ in range(5):
            reply, _msg = raw.get()
            finals.setdefault(reply["id"], []).append(reply)
        with pytest.raises(queue.Empty):  # no sixth reply
            raw.get(timeout=1.0)
        codes = sorted(f[0].get("error", {}).get("code", "ok") for f in finals.values())
        assert all(len(f) == 1 for f in finals.values()) and len(finals) == 5
        assert codes == ["ok", "ok", "rate_limited", "rate_limited", "unauthorized"]
        assert finals["nokey"][0]["error"]["code"] == "unauthorized"
        with client(broker) as c, pytest.raises(UnauthorizedError):
            c.generate(prompt="Hello", max_tokens=2, key="ekl-wrong")
    finally:
        raw.close()
        server.stop()
        broker.stop()


def test_a_key_owns_its_requests(tiny_bundle: Path, tmp_path: Path) -> None:
    """With keys, a request belongs to its key: another key sending the same id is refused "id in
    use" (nothing of the first is sent to it) and cannot cancel it; the same key cancels it."""
    from test_socket import hold_worker

    keys_file = tmp_path / "keys.json"
    alice, bob = add_key(keys_file, "alice", Limits()), add_key(keys_file, "bob", Limits())
    board = BoardConfig(
        socket=SocketConfig(path=str(tmp_path / "edge.sock")), keys=KeysConfig(file=str(keys_file))
    )
    server = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    server.start()
    line = Line(str(tmp_path / "edge.sock"))  # one connection, one uid: only the keys differ
    try:
        _, first = line.exchange({"id": "pin", "prompt": "Hello", "max_tokens": 4, "key": alice})
        assert "text" in first
        _, stolen = line.exchange({"id": "pin", "prompt": "Hello", "max_tokens": 4, "key": bob})
        assert stolen["error"]["code"] == "bad_request" and "id in use" in stolen["error"]["message"]
        release = hold_worker(server.scheduler)
        line.send({"id": "run", "prompt": "Hello", "max_tokens": 6, "key": alice})
        line.send({"cancel": "run", "key": bob})  # not bob's: ignored
        line.send({"id": "probe", "prompt": "Hello", "max_tokens": 1, "key": bob})
        release.set()
        replies = {}
        while len(replies) < 2:
            reply = line.recv()
            replies[reply["id"]] = reply
        assert replies["run"]["finish_reason"] == "length"
        release = hold_worker(server.scheduler)
        line.send({"id": "run2", "prompt": "Hello", "max_tokens": 6, "key": alice})
        line.send({"cancel": "run2", "key": alice})  # alice's own: cancelled
        release.set()
        assert line.recv()["error"]["code"] == "cancelled"
    finally:
        line.close()
        server.stop()
