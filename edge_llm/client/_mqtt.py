"""Client side of the MQTT transport (paho-mqtt 2.x, its own network thread).

Requests go to `<prefix>/<device>/generate` (or the fleet topic), QoS 1. Replies come back on
this client's reply topic (default `<prefix>/reply/<client id>`): MQTT 5 names it as the
Response Topic with the request id as Correlation Data; MQTT 3.1.1 puts it in `reply_to`.
paho reconnects with backoff on its own; after every reconnect each waiting request is told
(`RECONNECTED`) and sent again with the same id, which the server deduplicates.

With `require_online=True`, `connect()` also reads the devices' retained status topics (their
Last Will makes them `offline` when they drop) and fails at once when the addressed device (or,
for the fleet, every device of a fleet group) is not online, naming the devices that are.
paho set-up and start-up diagnosis are shared with the runtime (`edge_llm.mqtt_common`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_llm import mqtt_common, protocol
from edge_llm.client._core import RECONNECTED
from edge_llm.errors import TransportError
from edge_llm.protocol import Request
from edge_llm.topics import level_problem, topic_problem

log = logging.getLogger(__name__)


class MqttConnection:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        device: str | None = None,
        *,
        fleet: bool = False,
        protocol_version: Literal["5", "3.1.1"] = "5",
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        client_id: str | None = None,
        reply_topic: str | None = None,
        topic_prefix: str = "edge-llm",
        session_expiry_s: int = 300,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        require_online: bool = False,
        status_wait_s: float = 1.0,
    ) -> None:
        if fleet == (device is not None):
            raise ValueError("give a device id, or fleet=True")
        for value, what in ((device or "", "device"), (topic_prefix, "topic_prefix")):
            problem = level_problem(value, what)
            if problem is not None:
                raise ValueError(problem)
        self.host, self.port = host, port
        self.v5 = protocol_version == "5"
        self.tls = bool(tls or ca or cert)
        self.client_id = client_id or f"edge-llm-client-{uuid.uuid4().hex[:12]}"
        self.reply_topic = reply_topic or f"{topic_prefix}/reply/{self.client_id}"
        problem = topic_problem(self.reply_topic, "reply_topic")
        if problem is not None:
            raise ValueError(problem)
        self.device = device
        self.username = username
        self.topic_prefix = topic_prefix
        target = "fleet" if fleet else device
        self.request_topic = f"{topic_prefix}/{target}/generate"
        self.cancel_topic = f"{topic_prefix}/{target}/cancel"
        self.session_expiry_s = session_expiry_s
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.require_online = require_online
        self.status_wait_s = status_wait_s
        self._routes: dict[str, Callable[[Any], None]] = {}
        self._lock = threading.Lock()
        self._first = mqtt_common.FirstAnswer()
        self._sub_refused: str | None = None
        self._connects = 0
        self._started = False
        self._statuses: dict[str, dict[str, Any]] = {}
        self._status_changed = threading.Condition()
        # A v3.1.1 session cannot expire, so only a caller-chosen client id gets a persistent one.
        self.client = mqtt_common.new_client(
            self.client_id,
            v5=self.v5,
            clean=client_id is None,
            username=username,
            password=password,
            tls=self.tls,
            ca=ca,
            cert=cert,
            key=key,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self._subscribed = threading.Event()

    def describe(self) -> str:
        return f"mqtt://{self.host}:{self.port}/{self.request_topic}"

    def connect(self) -> None:
        """Connect and wait for the broker's answer; a refusal, a TLS/plain mismatch, no answer or
        (with `require_online`) an offline device raises TransportError naming the cause."""
        with self._lock:
            if self._started:
                return
            self._started = True
        kwargs = mqtt_common.connect_args(self.v5, self.keepalive, self.session_expiry_s)
        try:
            unreachable = mqtt_common.connect(self.client, self.host, self.port, self.tls, **kwargs)
        except TransportError:
            self._started = False
            raise
        if unreachable is not None:
            self._started = False
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {unreachable}")
        self.client.loop_start()
        answered = self._first.event.wait(self.connect_timeout)
        if not answered or self._first.refused is not None or self._first.closed_early:
            self.close()
            where = f"broker {self.host}:{self.port}"
            if not answered:
                raise TransportError(f"{where} did not answer within {self.connect_timeout:g} s")
            cause = self._first.fatal(self.host, self.port, self.tls, self.username)
            raise TransportError(cause or f"{where} refused the connection: {self._first.refused}")
        if not self._subscribed.wait(self.connect_timeout) or self._sub_refused is not None:
            self.close()
            raise TransportError(
                f"broker {self.host}:{self.port} refused {self.reply_topic}: {self._sub_refused}"
            )
        if self.require_online:
            problem = self.offline_problem()
            if problem is not None:
                self.close()
                raise TransportError(problem)

    def device_statuses(self) -> dict[str, dict[str, Any]] | None:
        """The devices' retained status messages (device id -> status), read within about
        `status_wait_s`; None when the broker does not let this client read them."""
        pattern = f"{self.topic_prefix}/+/status"
        done = threading.Event()
        granted: list[bool] = []

        def on_subscribe(_c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
            granted.append(not any(r.is_failure for r in reasons))
            done.set()

        self.client.message_callback_add(pattern, self._on_status)
        self.client.on_subscribe = on_subscribe
        try:
            self.client.subscribe(pattern, qos=1)
            if not done.wait(self.connect_timeout) or not granted[0]:
                return None
            # Retained messages follow the SUBACK at once; stop as soon as the target's status is
            # in, else after a short quiet period.
            end = time.monotonic() + self.status_wait_s
            with self._status_changed:
                while self.device not in self._statuses and time.monotonic() < end:
                    self._status_changed.wait(end - time.monotonic())
                return dict(self._statuses)
        finally:
            self.client.unsubscribe(pattern)
            self.client.message_callback_remove(pattern)
            self.client.on_subscribe = self._on_subscribe

    def offline_problem(self) -> str | None:
        """Why the addressed device (or fleet) cannot answer now, or None (also when unknown)."""
        statuses = self.device_statuses()
        if statuses is None:
            log.warning("cannot read the device status topics (broker ACL); not checking the device")
            return None
        online = sorted(d for d, s in statuses.items() if s.get("state") == "online")
        where = f"broker {self.host}:{self.port}"
        listing = f"devices online: {', '.join(online)}" if online else "no device is online there"
        if self.device is None:
            fleet = [d for d in online if (statuses[d].get("capabilities") or {}).get("fleet_group")]
            return None if fleet else f"no fleet device is online at {where} ({listing})"
        if self.device in online:
            return None
        seen = "is offline" if self.device in statuses else "has never announced itself"
        return f"device {self.device!r} {seen} at {where} ({listing})"

    def _on_status(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[-2]
        try:
            status = json.loads(msg.payload) if msg.payload else {"state": "gone"}
        except ValueError:
            return
        if isinstance(status, dict):
            with self._status_changed:
                self._statuses[device] = status
                self._status_changed.notify_all()

    def register(self, request_id: str, put: Callable[[Any], None]) -> None:
        with self._lock:
            self._routes[request_id] = put

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    def send(self, request: Request) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = request.id.encode()
        else:
            request = replace(request, reply_to=self.reply_topic)
        # QoS 1: while disconnected paho keeps the message and sends it after reconnecting.
        self.client.publish(self.request_topic, protocol.encode(request.to_dict()), qos=1, properties=props)

    def send_cancel(self, request_id: str) -> None:
        # The reply topic names whose request it is (the device ignores a cancel from others).
        message = {"cancel": request_id, "reply_to": self.reply_topic}
        self.client.publish(self.cancel_topic, protocol.encode(message), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._first.connack(reason)
        if reason.is_failure:
            return
        client.subscribe(self.reply_topic, qos=1)  # again on every connect: the broker may have lost it
        self._connects += 1
        if self._connects > 1:
            with self._lock:
                routes = list(self._routes.values())
            for put in routes:
                put(RECONNECTED)

    def _on_disconnect(self, _client: mqtt.Client, _u: Any, _flags: Any, _reason: Any, _p: Any) -> None:
        self._first.closed()  # before any CONNACK: a TLS/plain mismatch, a missing client certificate

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        if any(r.is_failure for r in reasons) and not self._subscribed.is_set():
            self._sub_refused = ", ".join(str(r) for r in reasons)
        self._subscribed.set()

    def _on_message(self, _client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            log.warning("ignored a reply that is not JSON on %s", msg.topic)
            return
        if not isinstance(reply, dict):
            return
        rid = reply.get("id")
        if rid is None and msg.properties is not None:
            corr = getattr(msg.properties, "CorrelationData", None)
            rid = corr.decode("utf-8", "replace") if corr else None
        with self._lock:
            put = self._routes.get(str(rid))
        if put is not None:
            put(reply)
