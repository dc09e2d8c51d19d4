"""Client side of the MQTT transport (paho-mqtt 2.x, its own network thread).

Requests go to `<prefix>/<device>/generate` (or the fleet topic), QoS 1. Replies come back on
this client's reply topic (default `<prefix>/reply/<client id>`): MQTT 5 names it as the
Response Topic with the request id as Correlation Data; MQTT 3.1.1 puts it in `reply_to`.
paho reconnects with backoff on its own; after every reconnect each waiting request is told
(`RECONNECTED`) and sent again with the same id, which the server deduplicates.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_llm import protocol
from edge_llm.client._core import RECONNECTED
from edge_llm.errors import TransportError
from edge_llm.protocol import Request
from edge_llm.transports.mqtt import no_delay

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
    ) -> None:
        if fleet == (device is not None):
            raise ValueError("give a device id, or fleet=True")
        self.host, self.port = host, port
        self.v5 = protocol_version == "5"
        self.client_id = client_id or f"edge-llm-client-{uuid.uuid4().hex[:12]}"
        self.reply_topic = reply_topic or f"{topic_prefix}/reply/{self.client_id}"
        target = "fleet" if fleet else device
        self.request_topic = f"{topic_prefix}/{target}/generate"
        self.cancel_topic = f"{topic_prefix}/{target}/cancel"
        self.session_expiry_s = session_expiry_s
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._routes: dict[str, Callable[[Any], None]] = {}
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._refused: str | None = None
        self._connects = 0
        self._started = False
        # A v3.1.1 session cannot expire, so only a caller-chosen client id gets a persistent one.
        persistent_v3 = client_id is not None
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else not persistent_v3,
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls or ca or cert:
            self.client.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
        self.client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        no_delay(self.client)
        self._subscribed = threading.Event()

    def describe(self) -> str:
        return f"mqtt://{self.host}:{self.port}/{self.request_topic}"

    def connect(self) -> None:
        """Connect and wait for the broker's answer; a refusal or no answer raises TransportError."""
        with self._lock:
            if self._started:
                return
            self._started = True
        kwargs: dict[str, Any] = {"keepalive": self.keepalive}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            kwargs.update(clean_start=False, properties=props)
        try:
            self.client.connect(self.host, self.port, **kwargs)
        except (OSError, ssl.SSLError) as exc:
            self._started = False
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self.client.loop_start()
        if not self._connack.wait(self.connect_timeout) or self._refused is not None:
            reason = self._refused or "no answer"
            self.close()
            raise TransportError(f"broker {self.host}:{self.port} refused the connection: {reason}")
        if not self._subscribed.wait(self.connect_timeout) or self._refused is not None:
            self.close()
            raise TransportError(
                f"broker {self.host}:{self.port} refused {self.reply_topic}: {self._refused}"
            )

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
        if reason.is_failure:
            if not self._connack.is_set():
                self._refused = str(reason)
                self._connack.set()
            return
        client.subscribe(self.reply_topic, qos=1)  # again on every connect: the broker may have lost it
        self._connects += 1
        self._connack.set()
        if self._connects > 1:
            with self._lock:
                routes = list(self._routes.values())
            for put in routes:
                put(RECONNECTED)

    def _on_disconnect(self, _client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if not self._connack.is_set():  # dropped before any CONNACK (e.g. a TLS or protocol mismatch)
            self._refused = f"connection closed before the broker answered ({reason})"
            self._connack.set()

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        if any(r.is_failure for r in reasons) and not self._subscribed.is_set():
            self._refused = ", ".join(str(r) for r in reasons)
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
