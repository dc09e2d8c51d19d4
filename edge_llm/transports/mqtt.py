"""MQTT transport (paho-mqtt 2.x): requests in on topics, replies out to each request's reply topic.

Topics (prefix "edge-llm", device D):
- `edge-llm/D/generate` (QoS 1): requests. With `fleet_group` G, also the shared subscription
  `$share/G/edge-llm/fleet/generate`, so the broker spreads fleet requests over the devices.
- `edge-llm/D/cancel` (and `edge-llm/fleet/cancel`): `{"cancel": "<id>", "reply_to": "<topic>"}`.
- `edge-llm/D/generate/<user>` and `edge-llm/D/cancel/<user>`: the same, owned by <user>. A
  subscriber cannot see who published, so request ownership comes from the topic: with the
  broker ACL `pattern write edge-llm/+/generate/%u` (and `.../cancel/%u`) only the logged-in
  user <user> can publish there. On the plain topics the owner is the reply topic: a stored final
  is replayed only to the same reply topic, and a cancel must name it (docs/protocol.md).
- `edge-llm/D/status`: retained `online` JSON (model, capabilities) at connect; `offline` on a
  clean stop and, as the Last Will, when the connection dies.
Replies (QoS 1): MQTT 5 to the request's Response Topic, echoing its Correlation Data; MQTT 3.1.1
(or a v5 request without a Response Topic) to the request's `reply_to` field.

The session is persistent (fixed client id, clean_start false, session expiry), so QoS 1 requests
sent while the runtime is down wait on the broker and are served when it is back. paho's network
thread reconnects with exponential backoff and keeps unacknowledged QoS 1 replies to resend; we
subscribe again on every connect in case the broker lost the session. Callbacks only parse and
submit (`Dispatcher.handle`, which never blocks); generation happens on the scheduler's thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_llm import protocol
from edge_llm.board import MqttConfig
from edge_llm.errors import ConfigError, TransportError
from edge_llm.transports.base import Dispatcher

log = logging.getLogger(__name__)

# CONNACK refusals that retrying will not fix: fail `start()` at once instead of looping.
_FATAL_CONNACK = {
    "Bad user name or password",
    "Not authorized",
    "Client identifier not valid",
    "Unsupported protocol version",
    "Banned",
    "Bad authentication method",
}


class Topics:
    def __init__(self, prefix: str, device: str, fleet_group: str = "") -> None:
        self.generate = f"{prefix}/{device}/generate"
        self.cancel = f"{prefix}/{device}/cancel"
        self.generate_user = f"{self.generate}/+"  # the last level names the owner (ACL %u)
        self.cancel_user = f"{self.cancel}/+"
        self.status = f"{prefix}/{device}/status"
        self.fleet_generate = f"$share/{fleet_group}/{prefix}/fleet/generate" if fleet_group else None
        self.fleet_cancel = f"{prefix}/fleet/cancel" if fleet_group else None

    def subscriptions(self) -> list[tuple[str, int]]:
        topics = [self.generate, self.cancel, self.generate_user, self.cancel_user]
        topics += [self.fleet_generate, self.fleet_cancel]
        return [(t, 1) for t in topics if t is not None]


def make_client(cfg: MqttConfig, client_id: str, *, clean: bool = False) -> mqtt.Client:
    """A paho client set up from the config: protocol, auth, TLS, backoff. Not connected."""
    v5 = cfg.protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
    )
    password = cfg.password
    if cfg.password_file:
        try:
            password = Path(cfg.password_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: {exc}") from None
    if cfg.username:
        client.username_pw_set(cfg.username, password or None)
    if cfg.tls.enabled:
        try:
            client.tls_set(
                ca_certs=cfg.tls.ca or None,
                certfile=cfg.tls.cert or None,
                keyfile=cfg.tls.key or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls: {exc}") from None
    client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
    client.max_inflight_messages_set(64)
    # While the broker is away, replies wait in memory; bound that on a small board (a client
    # whose reply was dropped gets the stored final when it retries).
    client.max_queued_messages_set(10_000)
    no_delay(client)
    return client


def no_delay(client: mqtt.Client) -> None:
    """Send each MQTT packet at once (TCP_NODELAY) on every socket the client opens.

    Streamed replies are many small QoS 1 packets: with Nagle's algorithm a packet waits for the
    ACK of the previous one, which the peer delays up to 40 ms (measured here: QoS 1 round trips
    to the local mosquitto with a 42 ms tail, 0.5 ms with TCP_NODELAY)."""

    def on_open(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(AttributeError, OSError):  # a websocket wrapper has no such option
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = on_open


def connect_properties(cfg: MqttConfig) -> Properties | None:
    if cfg.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry_s
    return props


class _Reply:
    """Reply address of one MQTT request."""

    def __init__(self, transport: MqttTransport, topic: str, correlation: bytes | None) -> None:
        self.transport = transport
        self.topic = topic
        self.correlation = correlation
        self.client = topic
        self.identity = f"mqtt-reply:{topic}"  # on the plain topics the reply topic is the owner
        self.key = f"{topic}\0{correlation.hex() if correlation else ''}"

    def send(self, reply: dict[str, Any]) -> None:
        self.transport.publish_reply(self.topic, self.correlation, reply)


class MqttTransport:
    def __init__(self, dispatcher: Dispatcher, cfg: MqttConfig, status: dict[str, Any] | None = None) -> None:
        if not cfg.host or not cfg.device:
            raise ConfigError("mqtt: host and device are required")
        self.dispatcher = dispatcher
        self.cfg = cfg
        self.v5 = cfg.protocol == "5"
        self.topics = Topics(cfg.topic_prefix, cfg.device, cfg.fleet_group)
        self.status = {"state": "online", "device": cfg.device, **(status or {})}
        self.client_id = cfg.client_id or f"edge-llm-{cfg.device}"
        self.client = make_client(cfg, self.client_id)
        offline = json.dumps({"state": "offline", "device": cfg.device}).encode()
        self.client.will_set(self.topics.status, offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._first_connack = threading.Event()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self.connected = threading.Event()
        self.connects = 0

    # -- lifecycle --

    def start(self, wait_s: float = 10.0) -> None:
        """Connect and start the network thread. A refused login or a TLS failure raises
        TransportError; an unreachable broker is logged and retried in the background."""
        cfg = self.cfg
        kwargs: dict[str, Any] = {"keepalive": cfg.keepalive, "properties": connect_properties(cfg)}
        if self.v5:
            kwargs["clean_start"] = False
        try:
            self.client.connect(cfg.host, cfg.port, **kwargs)
        except ssl.SSLError as exc:
            raise TransportError(f"TLS with {cfg.host}:{cfg.port} failed: {exc}") from None
        except OSError as exc:
            log.warning("broker %s:%d unreachable (%s); retrying in the background", cfg.host, cfg.port, exc)
            self.client.connect_async(cfg.host, cfg.port, **kwargs)
            self.client.loop_start()
            return  # serve the other transports meanwhile; the subscriptions follow the connection
        self.client.loop_start()
        if not self._first_connack.wait(wait_s):
            log.warning("no answer from broker %s:%d yet; still trying", cfg.host, cfg.port)
            return
        if self._refused is not None:
            self.client.loop_stop()
            self.client.disconnect()
            raise TransportError(f"broker {cfg.host}:{cfg.port} refused the connection: {self._refused}")
        # Return once the broker has our subscriptions, so a request sent right after is not missed.
        if not self._subscribed.wait(wait_s):
            log.warning("broker %s:%d has not confirmed our subscriptions yet", cfg.host, cfg.port)

    def stop(self, wait_s: float = 3.0) -> None:
        """Publish `offline` (retained), disconnect cleanly, stop the network thread."""
        if self.connected.is_set():
            offline = json.dumps({"state": "offline", "device": self.cfg.device})
            info = self.client.publish(self.topics.status, offline, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # not connected after all
                info.wait_for_publish(wait_s)
        self.client.disconnect()
        self.client.loop_stop()

    # -- replies (any thread) --

    def publish_reply(self, topic: str, correlation: bytes | None, reply: dict[str, Any]) -> None:
        props = None
        if self.v5 and correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        try:
            # QoS 1 and paho's own queue: a reply made while the broker is away goes out on
            # reconnect. Chunks may go at QoS 0 (`chunk_qos`): the final holds the whole text.
            qos = self.cfg.chunk_qos if "seq" in reply else 1
            self.client.publish(topic, protocol.encode(reply), qos=qos, properties=props)
        except (ValueError, TypeError) as exc:  # e.g. a reply topic with wildcards
            log.warning("cannot publish a reply to %r: %s", topic, exc)

    # -- paho callbacks (network thread): thin --

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            name = str(reason)
            log.warning("broker refused the connection: %s", name)
            if name in _FATAL_CONNACK and not self._first_connack.is_set():
                self._refused = name
                self._first_connack.set()
            return
        self.connects += 1
        # Subscribe every time: a broker restarted without persistence has forgotten us.
        client.subscribe(self.topics.subscriptions())
        client.publish(self.topics.status, json.dumps(self.status), qos=1, retain=True)
        self.connected.set()
        self._first_connack.set()
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            getattr(flags, "session_present", None),
        )

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:  # e.g. an ACL that does not let this account read the request topic
            log.error("broker refused subscriptions: %s", ", ".join(refused))
        self._subscribed.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if reason is not None and getattr(reason, "is_failure", False):
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None

        def resolve(reply_to: str | None) -> _Reply | None:
            topic = response_topic or reply_to
            if not topic:
                return None
            return _Reply(self, topic, correlation if response_topic else None)

        base, _, user = msg.topic.rpartition("/")
        if base not in (self.topics.generate, self.topics.cancel) or not user:
            base, user = msg.topic, ""
        cancel_only = base in (self.topics.cancel, self.topics.fleet_cancel)
        identity = f"mqtt-user:{user}" if user else None  # None: the reply topic owns the request
        try:
            accept = "cancel" if cancel_only else "any"
            self.dispatcher.handle(bytes(msg.payload), resolve, accept=accept, identity=identity)
        except Exception:  # an exception escaping a paho callback would kill the network thread
            log.exception("failed to handle a message on %s", msg.topic)
