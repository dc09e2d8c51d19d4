"""MQTT end to end against real Mosquitto brokers the tests start (own ports, configs, certs)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_llm.board import BoardConfig, MqttConfig, TlsConfig
from edge_llm.client import Result, RetryPolicy
from edge_llm.engine import Engine
from edge_llm.errors import CancelledError, RequestError, TransportError
from edge_llm.protocol import Request
from edge_llm.server import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from mosquitto import Broker, make_certs
from mqtt_helpers import DEVICE, GENERATE, HELLO, Raw, broker, client, server, start_server, status

__all__ = ["broker", "server"]  # fixtures, used by name


def test_round_trip_stream_and_status(tiny_bundle: Path, tmp_path: Path, broker: Broker) -> None:
    s = start_server(tiny_bundle, tmp_path, broker)
    online = status(broker)
    assert online["state"] == "online" and online["device"] == DEVICE and online["model"] == "tiny-none"
    assert online["capabilities"]["stream"] and "busy" in online["capabilities"]["error_codes"]
    with client(broker) as c:
        stream = c.stream(messages=HELLO, max_tokens=20, ignore_eos=True)
        deltas = list(stream)
        assert stream.result is not None and len(deltas) > 1
        assert "".join(deltas) == stream.result.text and stream.result.usage["completion_tokens"] == 20
        result = c.generate(messages=HELLO, max_tokens=5)
        assert isinstance(result, Result) and result.finish_reason in ("stop", "length")
    s.stop()
    assert status(broker)["state"] == "offline"  # said on a clean stop


def test_chunk_qos_0_and_no_nagle_on_our_sockets(tiny_bundle: Path, tmp_path: Path, broker: Broker) -> None:
    s = start_server(tiny_bundle, tmp_path, broker, chunk_qos=0)
    raw = Raw(broker)
    try:
        raw.subscribe("q0/replies")  # at QoS 1: what arrives at 0 was published at 0
        request = {"id": "q0", "prompt": "x", "max_tokens": 5, "ignore_eos": True, "stream": True}
        raw.publish(GENERATE, json.dumps(request).encode(), "q0/replies")
        got = []
        while not got or not got[-1][0].get("done"):
            reply, msg = raw.get()
            got.append((reply, msg.qos))
        assert [(r["seq"], q) for r, q in got[:-1]] == [(i, 0) for i in range(5)]
        assert got[-1][1] == 1 and got[-1][0]["text"] == "".join(r["delta"] for r, _ in got[:-1])
        # Nagle off on the runtime's and the SDK's broker connections (small packets go at once).
        assert s.mqtt is not None
        assert s.mqtt.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with client(broker) as c:  # and the SDK streams as usual
            sock = c.connection.client.socket()  # type: ignore[attr-defined]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            stream = c.stream(messages=HELLO, max_tokens=8, ignore_eos=True)
            assert "".join(stream) == stream.result.text  # type: ignore[union-attr]
    finally:
        raw.close()
        s.stop()


def test_mosquitto_rr_gets_one_final_reply(server: Server, broker: Broker) -> None:
    request = json.dumps({"id": "rr-1", "prompt": "Once upon a time", "max_tokens": 6, "stream": False})
    proc = subprocess.run(
        ["mosquitto_rr", "-h", broker.host, "-p", str(broker.port), "-t", GENERATE, "-e", "rr/replies/1",
         "-q", "1", "-m", request, "-W", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["id"] == "rr-1" and reply["done"] is True and reply["usage"]["completion_tokens"] <= 6


def test_v5_reply_echoes_correlation_data(server: Server, broker: Broker) -> None:
    raw = Raw(broker)
    raw.subscribe("my/replies")
    request = {"id": "c1", "messages": HELLO, "max_tokens": 4, "stream": True}
    raw.publish(GENERATE, json.dumps(request).encode(), "my/replies", b"\x00corr\xff")
    chunks = []
    while True:
        reply, msg = raw.get()
        assert msg.properties.CorrelationData == b"\x00corr\xff"
        if reply.get("done"):
            break
        chunks.append(reply["delta"])
    assert reply["id"] == "c1" and "".join(chunks) == reply["text"]
    raw.close()


def test_mqtt_311_client_with_reply_to(tiny_bundle: Path, tmp_path: Path, broker: Broker) -> None:
    s = start_server(tiny_bundle, tmp_path, broker, protocol="3.1.1")  # the server on 3.1.1 too
    try:
        raw = Raw(broker, v5=False)
        raw.subscribe("v3/replies")
        raw.publish(
            GENERATE,
            json.dumps({"id": "v3", "messages": HELLO, "max_tokens": 4, "reply_to": "v3/replies"}).encode(),
        )
        reply, _ = raw.get()
        assert reply["id"] == "v3" and reply["done"] is True and "text" in reply
        raw.close()
        with client(broker, protocol_version="3.1.1") as c:  # the SDK's 3.1.1 mode sets reply_to itself
            same = c.generate(messages=HELLO, max_tokens=4)  # greedy, new id: generated again
        assert (
            same.text == reply["text"]
            and same.usage["completion_tokens"] == reply["usage"]["completion_tokens"]
        )
        assert s.scheduler.stats["runs"] == 2
    finally:
        s.stop()


def test_each_bad_input_gets_its_error_and_the_server_keeps_serving(
    tiny_bundle: Path, tmp_path: Path, broker: Broker
) -> None:
    s = start_server(tiny_bundle, tmp_path, broker, server={"max_queue": 1})
    raw = Raw(broker)
    raw.subscribe("bad/replies")
    cases: list[tuple[str, bytes, str | None, str, str]] = [
        (GENERATE, b"{nope", None, "bad_request", "not JSON"),
        (GENERATE, b'{"id": "u", "prompt": "\xc3\x28"}', None, "bad_request", "UTF-8"),
        (
            GENERATE,
            json.dumps({"id": "big", "prompt": "x" * 5000}).encode(),
            None,
            "bad_request",
            "limit is 4096",
        ),
        (
            GENERATE,
            json.dumps({"id": "unk", "prompt": "x", "model": "gpt"}).encode(),
            "unk",
            "bad_request",
            "model",
        ),
        (
            GENERATE,
            json.dumps({"id": "typ", "prompt": "x", "stream": 1}).encode(),
            "typ",
            "bad_request",
            "stream",
        ),
        (
            GENERATE,
            json.dumps({"id": "long", "prompt": "x", "max_tokens": 9999}).encode(),
            "long",
            "too_long",
            "context",
        ),
        (
            f"edge-llm/{DEVICE}/cancel",
            json.dumps({"id": "c", "prompt": "x"}).encode(),
            "c",
            "bad_request",
            "cancel",
        ),
    ]
    try:
        for topic, payload, rid, code, needle in cases:
            raw.publish(topic, payload, "bad/replies", b"k")
            reply, _ = raw.get()
            assert reply["id"] == rid and reply["error"]["code"] == code, reply
            assert needle in reply["error"]["message"], reply
        # No reply address at all (v5 without Response Topic, no reply_to): dropped, nothing breaks.
        raw.publish(GENERATE, b"\xff garbage")
        raw.publish(GENERATE, json.dumps({"id": "lost", "prompt": "x"}).encode())
        # Full queue: `busy` at once. Hold the worker with a long request, fill the one place.
        raw.publish(
            GENERATE,
            json.dumps(
                {"id": "h", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
            ).encode(),
            "bad/replies",
        )
        # Hold "h" between two tokens until `busy` came back: on a fast machine the tiny model
        # could finish it before "q" arrives, and then "q" would run and "over" find room.
        gate = threading.Event()
        step = s.engine.step
        s.engine.step = lambda seqs: (gate.wait(10), step(seqs))[1]
        assert raw.get()[0]["id"] == "h"  # first chunk: it is running
        raw.publish(GENERATE, json.dumps({"id": "q", "prompt": "x", "max_tokens": 2}).encode(), "bad/replies")
        raw.publish(
            GENERATE, json.dumps({"id": "over", "prompt": "x", "max_tokens": 2}).encode(), "bad/replies"
        )
        finals = {}
        while len(finals) < 3:
            reply, _ = raw.get()
            if reply.get("done"):
                finals[reply["id"]] = reply
                gate.set()
        assert finals["over"]["error"]["code"] == "busy"
        assert "text" in finals["h"] and "text" in finals["q"]
        assert s.dispatcher.stats["no_reply_address"] == 1 and s.dispatcher.stats["bad_request"] == 7
    finally:
        raw.close()
        s.stop()


def test_twenty_concurrent_clients_all_answered(server: Server, broker: Broker) -> None:
    results: dict[int, Result] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with client(broker) as c:
                results[i] = c.generate(messages=HELLO, max_tokens=6, ignore_eos=True, request_id=f"cc-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(results) == list(range(20))
    assert all(r.id == f"cc-{i}" and r.usage["completion_tokens"] == 6 for i, r in results.items())
    # max_queue is 16: any client told `busy` retried (same id) and was served, never twice.
    assert server.scheduler.stats["runs"] == 20


def test_same_request_id_twice_is_generated_once(server: Server, broker: Broker) -> None:
    with client(broker, client_id="app-1") as a:
        first = a.generate(messages=HELLO, max_tokens=8, request_id="same-id")
    with client(broker, client_id="app-1") as again:  # same reply topic: same owner
        second = again.generate(messages=HELLO, max_tokens=8, request_id="same-id")
    assert second == first
    assert server.scheduler.stats["runs"] == 1 and server.scheduler.stats["replayed"] == 1
    # Another client (another reply topic) sending that id gets no one else's answer.
    with client(broker) as other, pytest.raises(RequestError, match="id in use"):
        other.generate(messages=HELLO, max_tokens=8, request_id="same-id")


def wait_for(predicate: Any, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def hold(server: Server) -> threading.Event:
    """Keep the scheduler's worker busy (its sink blocks) until the returned event is set."""
    release, held = threading.Event(), threading.Event()

    def sink(_e: Any) -> None:
        held.set()
        release.wait(30)

    server.scheduler.submit(Request(id=f"hold-{time.monotonic()}", prompt="x", max_tokens=1), sink)
    assert held.wait(30)
    return release


def test_plain_topic_cancel_must_name_the_reply_topic(server: Server, broker: Broker) -> None:
    raw = Raw(broker)
    raw.subscribe("mine/replies")
    try:
        release = hold(server)
        ask = {"id": "c1", "messages": HELLO, "max_tokens": 8, "ignore_eos": True, "reply_to": "mine/replies"}
        raw.publish(GENERATE, json.dumps(ask).encode())
        wait_for(lambda: server.dispatcher.stats["request"] == 1)
        cancel = f"edge-llm/{DEVICE}/cancel"
        raw.publish(cancel, json.dumps({"cancel": "c1"}).encode())  # names nobody: ignored
        raw.publish(cancel, json.dumps({"cancel": "c1", "reply_to": "other/replies"}).encode())
        wait_for(lambda: server.scheduler.stats["cancel_refused"] == 1)
        release.set()
        reply, _ = raw.get()
        assert reply["id"] == "c1" and reply["finish_reason"] == "length"
        release = hold(server)
        raw.publish(GENERATE, json.dumps({**ask, "id": "c2"}).encode())
        wait_for(lambda: server.dispatcher.stats["request"] == 2)
        raw.publish(cancel, json.dumps({"cancel": "c2", "reply_to": "mine/replies"}).encode())
        wait_for(lambda: server.dispatcher.stats["cancel"] == 3)
        release.set()
        reply, _ = raw.get()
        assert reply["id"] == "c2" and reply["error"]["code"] == "cancelled"
    finally:
        raw.close()
    # The SDK names its reply topic in its cancels.
    with client(broker) as c:
        stream = c.stream(messages=HELLO, max_tokens=200, ignore_eos=True)
        with pytest.raises(CancelledError):
            for _ in stream:
                stream.cancel()


def test_per_user_topics_keep_requests_to_their_user(tiny_bundle: Path, tmp_path: Path) -> None:
    """With the `%u` ACL patterns only alice can publish to generate/alice, so the device knows a
    request there is alice's: bob can neither read her answer by its id nor cancel her request."""
    acl = (
        "user board\ntopic read edge-llm/+/generate\ntopic read edge-llm/+/generate/+\n"
        "topic read edge-llm/+/cancel\ntopic read edge-llm/+/cancel/+\n"
        "topic write edge-llm/+/status\ntopic write edge-llm/reply/#\n"
        "pattern write edge-llm/+/generate/%u\npattern write edge-llm/+/cancel/%u\n"
        "pattern read edge-llm/reply/%u/#\n"
    )
    users = {"board": "b-pw", "alice": "a-pw", "bob": "m-pw"}
    broker = Broker(tmp_path / "acl", users=users, acl=acl).start()
    s = start_server(tiny_bundle, tmp_path, broker, username="board", password="b-pw")
    alice = Raw(broker, username="alice", password="a-pw")
    bob = Raw(broker, username="bob", password="m-pw")
    try:
        alice.subscribe("edge-llm/reply/alice/#")
        bob.subscribe("edge-llm/reply/bob/#")
        ask = {"id": "pin", "messages": HELLO, "max_tokens": 8}
        alice.publish(f"{GENERATE}/alice", json.dumps(ask).encode(), "edge-llm/reply/alice/1", b"a")
        answer, _ = alice.get()
        assert answer["id"] == "pin" and "text" in answer
        # Bob sends her id on his own topic: refused, and nothing of hers reaches him.
        bob.publish(f"{GENERATE}/bob", json.dumps(ask).encode(), "edge-llm/reply/bob/1", b"b")
        refused, _ = bob.get()
        assert refused["error"]["code"] == "bad_request" and "id in use" in refused["error"]["message"]
        # Bob cannot publish as alice: the broker drops it before the device sees it.
        before = s.dispatcher.stats["request"]
        bob.publish(f"{GENERATE}/alice", json.dumps(ask).encode(), "edge-llm/reply/bob/2", b"c")
        with pytest.raises(queue.Empty):
            bob.get(timeout=1.0)
        assert s.dispatcher.stats["request"] == before
        # Alice herself gets her stored final again.
        alice.publish(f"{GENERATE}/alice", json.dumps(ask).encode(), "edge-llm/reply/alice/1", b"a")
        again, _ = alice.get()
        assert again == answer
        # Bob's cancel of alice's running request (on his own cancel topic) is ignored.
        release = hold(s)
        slow = {"id": "slow", "messages": HELLO, "max_tokens": 8, "ignore_eos": True}
        alice.publish(f"{GENERATE}/alice", json.dumps(slow).encode(), "edge-llm/reply/alice/1", b"a")
        wait_for(lambda: s.dispatcher.stats["request"] == before + 2)
        bob.publish(f"edge-llm/{DEVICE}/cancel/bob", json.dumps({"cancel": "slow"}).encode())
        wait_for(lambda: s.scheduler.stats["cancel_refused"] == 1)
        release.set()
        done, _ = alice.get()
        assert done["id"] == "slow" and done["finish_reason"] == "length"
        # Her own cancel works.
        release = hold(s)
        slow2 = json.dumps({**slow, "id": "slow2"}).encode()
        alice.publish(f"{GENERATE}/alice", slow2, "edge-llm/reply/alice/1")
        wait_for(lambda: s.dispatcher.stats["request"] == before + 3)
        alice.publish(f"edge-llm/{DEVICE}/cancel/alice", json.dumps({"cancel": "slow2"}).encode())
        wait_for(lambda: s.dispatcher.stats["cancel"] == 2)
        release.set()
        cancelled, _ = alice.get()
        assert cancelled["id"] == "slow2" and cancelled["error"]["code"] == "cancelled"
    finally:
        alice.close()
        bob.close()
        s.stop()
        broker.stop()


def test_credentials_acl_and_wrong_password(tiny_bundle: Path, tmp_path: Path) -> None:
    acl = (
        "user board\ntopic read edge-llm/+/generate\ntopic read edge-llm/+/cancel\n"
        "topic write edge-llm/+/status\ntopic write edge-llm/reply/#\n"
        "user app\ntopic write edge-llm/+/generate\ntopic read edge-llm/reply/#\n"
    )
    broker = Broker(tmp_path / "auth", users={"board": "b-secret", "app": "a-secret"}, acl=acl).start()
    try:
        with pytest.raises(TransportError, match="refused"):
            start_server(tiny_bundle, tmp_path, broker, username="board", password="wrong")
        pw = tmp_path / "board.pw"
        pw.write_text("b-secret\n")
        s = start_server(tiny_bundle, tmp_path, broker, username="board", password_file=str(pw))
        try:
            with pytest.raises(TransportError, match="refused"):
                client(broker, username="app", password="nope")
            with client(broker, username="app", password="a-secret") as c:
                assert c.generate(messages=HELLO, max_tokens=3).finish_reason in ("stop", "length")
        finally:
            s.stop()
    finally:
        broker.stop()


def test_tls_with_certificates_made_here(tiny_bundle: Path, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    broker = Broker(tmp_path / "tls", certs=certs, require_client_cert=True).start()
    tls = TlsConfig(enabled=True, ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key))
    try:
        s = start_server(tiny_bundle, tmp_path, broker, tls=tls)
        try:
            with client(
                broker, ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key)
            ) as c:
                assert c.generate(messages=HELLO, max_tokens=3).usage["completion_tokens"] <= 3
            with pytest.raises(TransportError):  # no client certificate: the broker refuses the handshake
                client(broker, ca=str(certs.ca), connect_timeout=5)
            with pytest.raises(TransportError):  # plain MQTT on a TLS port
                client(broker, connect_timeout=5)
        finally:
            s.stop()
    finally:
        broker.stop()


def test_broker_restarted_mid_stream_one_final(server: Server, broker: Broker) -> None:
    with client(broker) as c:
        stream = c.stream(messages=HELLO, max_tokens=200, ignore_eos=True, request_id="through-restart")
        deltas = []
        in_flight = False
        for delta in stream:
            if not deltas:
                in_flight = "through-restart" in server.scheduler._jobs  # still generating
                broker.restart()  # SIGTERM (state saved) and start again on the same port
            deltas.append(delta)
    result = stream.result
    assert result is not None and result.id == "through-restart"
    assert result.usage["completion_tokens"] == 200 and "".join(deltas) == result.text
    assert in_flight, "the broker went down only after the generation had finished"
    assert server.scheduler.stats["runs"] == 1  # generated once, however often the request arrived
    assert server.mqtt.connects >= 2  # the server reconnected and subscribed again


def test_runtime_killed_and_restarted_serves_what_was_sent_while_down(
    tiny_bundle: Path, tmp_path: Path, broker: Broker
) -> None:
    config = tmp_path / "board.toml"
    config.write_text(
        f'name = "test"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ndevice = "{DEVICE}"\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 0.5\n"
    )
    state = str(tmp_path / "state.sqlite")
    cmd = [sys.executable, "-m", "edge_llm.cli", "serve", "--bundle", str(tiny_bundle)]
    cmd += ["--config", str(config), "--state", state]

    def serve() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        seen = []
        for raw in proc.stderr:  # "edge-llm: serving ..." comes once connected and subscribed
            seen.append(raw.decode(errors="replace"))
            if "serving tiny-none" in seen[-1]:
                break
        else:
            raise AssertionError("serve did not start:\n" + "".join(seen))
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        return proc

    proc = serve()
    # No resend on silence: an answer to "while-down" can only come from the broker's copy of the
    # request, queued in the runtime's persistent session while it was down.
    patient = RetryPolicy(resend_after_s=600)
    watcher = Raw(broker)
    watcher.subscribe(GENERATE)
    with client(broker, retry=patient) as c:
        before = c.generate(messages=HELLO, max_tokens=4, request_id="before")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while status(broker)["state"] != "offline":  # the Last Will, published by the broker
            assert time.monotonic() < deadline
            time.sleep(0.05)
        answer: list[Result] = []
        asker = threading.Thread(
            target=lambda: answer.append(c.generate(messages=HELLO, max_tokens=5, request_id="while-down"))
        )
        asker.start()
        ids: list[str] = []
        while "while-down" not in ids:  # the request reached the broker while nobody serves the device
            ids.append(watcher.get(10)[0].get("id"))
        watcher.close()
        assert not answer and asker.is_alive()
        proc = serve()
        try:
            asker.join(60)
            assert answer and answer[0].id == "while-down" and answer[0].usage["completion_tokens"] <= 5
            assert status(broker)["state"] == "online"
            # The dedup store survived the kill too: the first request is answered from it.
            assert c.generate(messages=HELLO, max_tokens=4, request_id="before") == before
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    assert status(broker)["state"] == "offline"


def test_fleet_shared_subscription_spreads_requests(
    tiny_bundle: Path, tmp_path: Path, broker: Broker
) -> None:
    a = start_server(tiny_bundle, tmp_path, broker, device="fa", fleet_group="g")
    b = start_server(tiny_bundle, tmp_path, broker, device="fb", fleet_group="g")
    try:
        with client(broker, device=None, fleet=True) as c:
            results = [c.generate(messages=HELLO, max_tokens=3, request_id=f"fleet-{i}") for i in range(6)]
        assert [r.id for r in results] == [f"fleet-{i}" for i in range(6)]
        runs = (a.scheduler.stats["runs"], b.scheduler.stats["runs"])
        assert sum(runs) == 6 and min(runs) >= 1, runs
    finally:
        a.stop()
        b.stop()


def test_no_broker_at_start_is_retried_in_the_background(tiny_bundle: Path, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "late")  # configured, not started yet
    cfg = MqttConfig(
        host=broker.host, port=broker.port, device=DEVICE, reconnect_min_s=0.1, reconnect_max_s=0.3
    )
    s = Server(Engine.load(tiny_bundle), BoardConfig(mqtt=cfg), state_path=tmp_path / "late.sqlite")
    s.start()  # logs and keeps trying
    try:
        broker.start()
        assert s.mqtt.connected.wait(20)
        with client(broker) as c:
            late = c.generate(messages=HELLO, max_tokens=2, request_id="late-1")
        assert (
            late.id == "late-1"
            and late.usage["completion_tokens"] <= 2
            and late.finish_reason in ("stop", "length")
        )
        assert s.scheduler.stats["runs"] == 1 and s.mqtt.connects == 1
    finally:
        s.stop()
        broker.stop()
    assert os.path.exists(tmp_path / "late.sqlite")
