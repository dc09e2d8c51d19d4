"""MQTT hardening against real Mosquitto brokers: hostile reply topics, broker limits and refusals
(the device stays connected), start-up errors that name their cause, `send` to a missing device."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm.board import TlsConfig
from edge_llm.errors import TransportError
from edge_llm.server import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from mosquitto import Broker, Certs, make_certs
from mqtt_helpers import DEVICE, GENERATE, Raw, broker, client, server, start_server, status

__all__ = ["broker", "server"]  # fixtures, used by name


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


def request(rid: str, **fields: object) -> bytes:
    return json.dumps({"id": rid, "prompt": "hi", "max_tokens": 4, **fields}).encode()


BAD_REPLY_TOPICS = [
    "x\u0001y",  # the repro: Mosquitto closes the connection on this topic
    "x\u0085y",  # C1 control
    "x\ufffey",  # a non-character
    "x\ud800y",  # a lone surrogate (not UTF-8 at all)
    "a/+/b",  # a wildcard
    f"edge-llm/{DEVICE}/status",  # the device's own status
    "edge-llm/other/generate",  # another device's requests
    "$SYS/broker/x",
]


def test_bad_reply_to_never_takes_the_device_offline(server: Server, broker: Broker) -> None:
    raw = Raw(broker, v5=False)  # MQTT 3.1.1: `reply_to` is the only reply address
    try:
        raw.subscribe("ok/replies")
        for i, topic in enumerate(BAD_REPLY_TOPICS):
            raw.publish(GENERATE, request(f"bad-{i}", reply_to=topic))
        raw.publish(GENERATE, request("next", reply_to="ok/replies"))
        reply, _ = raw.get()
        assert reply["id"] == "next" and reply["done"] is True and "text" in reply, reply
        # Nothing went to a bad topic, nothing was generated for it, the connection never dropped.
        # The lone surrogate is refused by the parser first, which never echoes such a string:
        # its bad_request names no address at all, so the transport never sees that topic.
        assert server.mqtt.stats["bad_reply_topic"] == len(BAD_REPLY_TOPICS) - 1
        assert server.scheduler.stats["runs"] == 1
        assert server.mqtt.connects == 1 and server.mqtt.connected.is_set()
        assert "Malformed" not in broker.log_text()
        with client(broker) as c:  # and the SDK is served as usual
            assert c.generate(prompt="hi", max_tokens=3, request_id="after").id == "after"
    finally:
        raw.close()


def test_bad_reply_to_with_a_good_response_topic_gets_bad_request(server: Server, broker: Broker) -> None:
    raw = Raw(broker)
    try:
        raw.subscribe("v5/replies")
        raw.publish(GENERATE, request("c1", reply_to="x\u0001y"), "v5/replies", b"k1")
        reply, msg = raw.get()
        assert reply["id"] == "c1" and reply["error"]["code"] == "bad_request", reply
        assert "U+0001" in reply["error"]["message"] and msg.properties.CorrelationData == b"k1"
        # A Response Topic the device may not use: dropped (it is the only address), logged, counted.
        raw.publish(GENERATE, request("c2"), f"edge-llm/{DEVICE}/cancel")
        raw.publish(GENERATE, request("c3"), "v5/replies")
        reply, _ = raw.get()
        assert reply["id"] == "c3" and reply["done"] is True and "text" in reply
        assert server.mqtt.stats["bad_reply_topic"] == 1 and server.mqtt.connects == 1
    finally:
        raw.close()


def test_reply_prefixes_limit_where_replies_go(tiny_bundle: Path, tmp_path: Path, broker: Broker) -> None:
    s = start_server(tiny_bundle, tmp_path, broker, reply_prefixes=("apps/a",))
    raw = Raw(broker)
    try:
        raw.subscribe("#")  # sees every publish: nothing may reach the refused topics
        raw.publish(GENERATE, request("no-1"), "apps/ab")  # "apps/a" covers apps/a/…, not apps/ab
        raw.publish(GENERATE, request("no-2"), "edge-llm/reply/me")  # outside the configured prefixes
        raw.publish(GENERATE, request("yes"), "apps/a/me")
        seen = []
        while not seen or seen[-1][1] != "apps/a/me":
            payload, msg = raw.get()
            seen.append((payload.get("id"), msg.topic))
        assert [t for _, t in seen if t.startswith(("apps/ab", "edge-llm/reply"))] == []
        assert seen[-1][0] == "yes" and s.mqtt.stats["bad_reply_topic"] == 2
    finally:
        raw.close()
        s.stop()


def test_oversize_reply_is_not_sent_and_the_device_stays_connected(tiny_bundle: Path, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "small", extra_config="max_packet_size 500").start()
    s = start_server(tiny_bundle, tmp_path, broker)
    raw = Raw(broker)
    try:
        assert s.mqtt.max_packet == 500  # advertised in the MQTT 5 CONNACK
        raw.subscribe("big/replies")
        raw.publish(GENERATE, request("big", max_tokens=200, ignore_eos=True), "big/replies")
        reply, _ = raw.get()
        assert reply["id"] == "big" and reply["error"]["code"] == "internal", reply
        assert "at most 500" in reply["error"]["message"] and s.mqtt.stats["oversize"] == 1
        raw.publish(GENERATE, request("small", max_tokens=2), "big/replies")
        reply, _ = raw.get()
        assert reply["id"] == "small" and "text" in reply
        assert s.mqtt.connects == 1 and s.mqtt.connected.is_set()
        s.stop()
        # MQTT 3.1.1: the broker does not advertise its limit; `max_packet_bytes` says it instead.
        s = start_server(tiny_bundle, tmp_path, broker, protocol="3.1.1", max_packet_bytes=500)
        raw.publish(GENERATE, request("big3", max_tokens=200, ignore_eos=True, reply_to="big/replies"))
        reply, _ = raw.get()
        assert reply["id"] == "big3" and reply["error"]["code"] == "internal", reply
        raw.publish(GENERATE, request("small3", max_tokens=2, reply_to="big/replies"))
        assert raw.get()[0]["id"] == "small3" and s.mqtt.connects == 1
    finally:
        raw.close()
        s.stop()
        broker.stop()


def test_publish_refused_by_the_broker_is_dropped_not_retried(tiny_bundle: Path, tmp_path: Path) -> None:
    acl = (
        "user board\ntopic read edge-llm/+/generate\ntopic read edge-llm/+/cancel\n"
        "topic write edge-llm/+/status\ntopic write edge-llm/reply/#\n"
        "user app\ntopic readwrite #\n"
    )
    broker = Broker(tmp_path / "acl", users={"board": "b", "app": "a"}, acl=acl).start()
    s = start_server(tiny_bundle, tmp_path, broker, username="board", password="b")
    raw = Raw(broker, username="app", password="a")
    try:
        raw.subscribe("edge-llm/reply/r")
        raw.publish(GENERATE, request("denied"), "elsewhere/r")  # allowed by the device, not by the ACL
        raw.publish(GENERATE, request("fine"), "edge-llm/reply/r")
        reply, _ = raw.get()
        assert reply["id"] == "fine" and "text" in reply
        assert s.mqtt.stats["publish_refused"] == 1  # PUBACK "Not authorized", logged and dropped
        assert s.mqtt.connects == 1 and s.mqtt.connected.is_set()
    finally:
        raw.close()
        s.stop()
        broker.stop()


# -- start-up errors that say what is wrong (issue 11, item 6) --


def test_tls_off_against_a_tls_only_broker(tiny_bundle: Path, tmp_path: Path, certs: Certs) -> None:
    with Broker(tmp_path / "tls", certs=certs) as broker:
        with pytest.raises(TransportError, match=r"TLS is off, but the broker .* expects TLS"):
            start_server(tiny_bundle, tmp_path, broker)
        with pytest.raises(TransportError, match="expects TLS"):  # the SDK says the same
            client(broker, connect_timeout=5)


def test_tls_on_against_a_plain_broker(
    tiny_bundle: Path, tmp_path: Path, broker: Broker, certs: Certs
) -> None:
    tls = TlsConfig(enabled=True, ca=str(certs.ca))
    with pytest.raises(TransportError, match=r"TLS is on, but the broker .* speaks plain MQTT"):
        start_server(tiny_bundle, tmp_path, broker, tls=tls)
    with pytest.raises(TransportError, match="speaks plain MQTT"):
        client(broker, ca=str(certs.ca), connect_timeout=5)


def test_tls_certificate_problems_are_named(tiny_bundle: Path, tmp_path: Path, certs: Certs) -> None:
    other_ca = make_certs(tmp_path / "other-pki").ca
    with Broker(tmp_path / "mtls", certs=certs, require_client_cert=True) as broker:
        with pytest.raises(TransportError, match="client certificate"):
            start_server(tiny_bundle, tmp_path, broker, tls=TlsConfig(enabled=True, ca=str(certs.ca)))
        with pytest.raises(TransportError, match="failed verification"):
            start_server(tiny_bundle, tmp_path, broker, tls=TlsConfig(enabled=True, ca=str(other_ca)))


def test_refused_logins_are_named(tiny_bundle: Path, tmp_path: Path) -> None:
    with Broker(tmp_path / "auth", users={"board": "secret"}) as broker:
        for version in ("5", "3.1.1"):
            with pytest.raises(TransportError, match=r"refused the login: .*check the username"):
                start_server(
                    tiny_bundle, tmp_path, broker, username="board", password="wrong", protocol=version
                )
            with pytest.raises(TransportError, match="no username was given"):
                start_server(tiny_bundle, tmp_path, broker, protocol=version)
        with pytest.raises(TransportError, match="no username was given"):  # the SDK says the same
            client(broker, connect_timeout=5)


def test_serve_exits_with_the_cause_instead_of_reconnecting_forever(
    tiny_bundle: Path, tmp_path: Path, certs: Certs
) -> None:
    with Broker(tmp_path / "tls", certs=certs) as broker:
        cmd = [sys.executable, "-m", "edge_llm.cli", "serve", "--bundle", str(tiny_bundle)]
        cmd += [
            "--mqtt",
            f"{broker.host}:{broker.port}",
            "--device",
            DEVICE,
            "--state",
            str(tmp_path / "s.db"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "expects TLS" in proc.stderr and "Unspecified error" not in proc.stderr, proc.stderr


def test_connects_and_reconnects_are_logged(
    tiny_bundle: Path, tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_llm.transports.mqtt")
    s = start_server(tiny_bundle, tmp_path, broker)
    try:
        broker.restart()
        with client(broker) as c:  # served again once the device is back
            assert c.generate(prompt="hi", max_tokens=2, request_id="r").id == "r"
        assert s.mqtt.connects >= 2
    finally:
        s.stop()
    records = [r for r in caplog.records if r.name == "edge_llm.transports.mqtt"]
    lines = [r.getMessage() for r in records]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert any(m.startswith(f"connected to {broker.host}:{broker.port}") for m in info), lines
    assert any(m.startswith(f"reconnected to {broker.host}:{broker.port}") for m in info), lines
    assert any(m.startswith("lost the connection") for m in lines), lines


# -- `edge-llm send` to a device that is not there (issue 12, first hour 5) --


def send(broker: Broker, device: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_llm.cli", "send", "--mqtt", f"{broker.host}:{broker.port}"]
    cmd += ["--device", device, "--max-tokens", "2", "hi"]
    # The default --timeout is 120 s: a run that waited for it would overrun this one.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_send_to_a_missing_device_says_so_at_once(server: Server, broker: Broker) -> None:
    proc = send(broker, "typo")
    assert proc.returncode == 2, proc.stderr
    assert "device 'typo' has never announced itself" in proc.stderr and f"online: {DEVICE}" in proc.stderr
    assert send(broker, DEVICE).returncode == 0  # the real one answers
    server.stop()
    assert status(broker)["state"] == "offline"
    proc = send(broker, DEVICE)
    assert proc.returncode == 2 and f"device '{DEVICE}' is offline" in proc.stderr, proc.stderr
    assert "no device is online" in proc.stderr


def test_sdk_require_online_for_device_and_fleet(tiny_bundle: Path, tmp_path: Path, broker: Broker) -> None:
    s = start_server(tiny_bundle, tmp_path, broker)  # no fleet group
    try:
        with client(broker, require_online=True) as c:
            assert c.generate(prompt="hi", max_tokens=2, request_id="on").id == "on"
        with pytest.raises(TransportError, match=f"no fleet device is online .*devices online: {DEVICE}"):
            client(broker, device=None, fleet=True, require_online=True)
        fleet = start_server(tiny_bundle, tmp_path, broker, device="f1", fleet_group="g")
        try:
            with client(broker, device=None, fleet=True, require_online=True) as c:
                assert c.generate(prompt="hi", max_tokens=2, request_id="fl").id == "fl"
        finally:
            fleet.stop()
    finally:
        s.stop()
