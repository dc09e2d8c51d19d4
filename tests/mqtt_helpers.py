"""Helpers for the MQTT tests: a server on a test broker, SDK clients, a bare paho client."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mosquitto import Broker
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_llm.board import BoardConfig, MqttConfig, ServerConfig
from edge_llm.client import MqttClient
from edge_llm.engine import Engine
from edge_llm.server import Server

DEVICE = "dev1"
GENERATE = f"edge-llm/{DEVICE}/generate"
HELLO = [{"role": "user", "content": "hello"}]


def start_server(
    bundle: Path,
    folder: Path,
    broker: Broker,
    device: str = DEVICE,
    server: dict[str, Any] | None = None,
    **mqtt_kw: Any,
) -> Server:
    cfg = MqttConfig(
        host=broker.host,
        port=broker.port,
        device=device,
        reconnect_min_s=0.1,  # a test broker restarts in well under a second
        reconnect_max_s=0.5,
        keepalive=10,
        **mqtt_kw,
    )
    board = BoardConfig(mqtt=cfg, server=ServerConfig(**{"max_payload": 4096, **(server or {})}))
    s = Server(Engine.load(bundle), board, state_path=folder / f"{device}.sqlite")
    s.start()
    return s


def client(broker: Broker, **kw: Any) -> Any:
    kw.setdefault("device", DEVICE)
    kw.setdefault("timeout", 60)
    return MqttClient(broker.host, broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5, **kw)


class Raw:
    """A bare paho client: publish exactly these bytes, see exactly what comes back."""

    def __init__(self, broker: Broker, v5: bool = True, **auth: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if auth:
            self.c.username_pw_set(auth["username"], auth["password"])
        self.c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *_a: done.set()
        self.c.subscribe(topic, qos=1)
        assert done.wait(10)

    def publish(
        self, topic: str, payload: bytes, response_topic: str | None = None, corr: bytes | None = None
    ) -> None:
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if corr is not None:
                props.CorrelationData = corr
        self.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def get(self, timeout: float = 30) -> tuple[dict[str, Any], mqtt.MQTTMessage]:
        m = self.messages.get(timeout=timeout)
        return json.loads(m.payload), m

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def server(tiny_bundle: Path, tmp_path: Path, broker: Broker) -> Iterator[Server]:
    """A device serving the tiny bundle on the test's broker."""
    s = start_server(tiny_bundle, tmp_path, broker)
    yield s
    s.stop()


def status(broker: Broker, device: str = DEVICE) -> dict[str, Any]:
    raw = Raw(broker)
    raw.subscribe(f"edge-llm/{device}/status")
    payload, msg = raw.get(10)
    raw.close()
    assert msg.retain
    return payload
