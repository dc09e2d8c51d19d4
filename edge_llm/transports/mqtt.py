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
- `edge-llm/D/update/...`: signed bundle updates (`edge_llm/ota_mqtt.py`, with `[ota]
  trusted_key`), which registers its topics here with `add_handler`.
- `edge-llm/D/metrics`: with `[mqtt] metrics_interval_s` > 0, a retained JSON summary (requests,
  errors, QPS, mean latency, tokens, queue, KV bytes; `Metrics.summary`) every that many seconds.
Replies (QoS 1): MQTT 5 to the request's Response Topic, echoing its Correlation Data; MQTT 3.1.1
(or a v5 request without a Response Topic) to the request's `reply_to` field.

The session is persistent (fixed client id, clean_start false, session expiry), so QoS 1 requests
sent while the runtime is down wait on the broker and are served when it is back. paho's network
thread reconnects with exponential backoff and keeps unacknowledged QoS 1 replies to resend; we
subscribe again on every connect in case the broker lost the session. Callbacks only parse and
submit (`Dispatcher.handle`, which never blocks); generation happens on the scheduler's thread.

One bad reply topic must not take the device off MQTT: Mosquitto closes the connection on a
malformed PUBLISH and paho re-sends it after every reconnect, forever. So a reply topic is
checked before use (`topics.reply_topic_problem`: MQTT's topic rules and `[mqtt] reply_prefixes`),
a reply larger than the broker's Maximum Packet Size (MQTT 5 CONNACK) is not sent (a final is
replaced by a short `internal` error), QoS is capped at the broker's Maximum QoS, and a publish
the broker refuses with a PUBACK reason code is logged and dropped (paho does not retry those).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_llm import mqtt_common, protocol
from edge_llm.board import MqttConfig
from edge_llm.errors import ConfigError, TransportError
from edge_llm.topics import reply_topic_problem
from edge_llm.transports.base import Dispatcher

log = logging.getLogger(__name__)


class Topics:
    def __init__(self, prefix: str, device: str, fleet_group: str = "") -> None:
        self.generate = f"{prefix}/{device}/generate"
        self.cancel = f"{prefix}/{device}/cancel"
        self.generate_user = f"{self.generate}/+"  # the last level names the owner (ACL %u)
        self.cancel_user = f"{self.cancel}/+"
        self.status = f"{prefix}/{device}/status"
        self.metrics = f"{prefix}/{device}/metrics"
        self.fleet_generate = f"$share/{fleet_group}/{prefix}/fleet/generate" if fleet_group else None
        self.fleet_cancel = f"{prefix}/fleet/cancel" if fleet_group else None

    def subscriptions(self) -> list[tuple[str, int]]:
        topics = [self.generate, self.cancel, self.generate_user, self.cancel_user]
        topics += [self.fleet_generate, self.fleet_cancel]
        return [(t, 1) for t in topics if t is not None]


def make_client(cfg: MqttConfig, client_id: str, *, clean: bool = False) -> mqtt.Client:
    """A paho client set up from the `[mqtt]` config (see `mqtt_common.new_client`). Not connected."""
    password = cfg.password
    if cfg.password_file:  # read at start-up: the secret stays out of the profile
        password = mqtt_common.read_password(cfg.password_file, "mqtt.password_file")
    client = mqtt_common.new_client(
        client_id,
        v5=cfg.protocol == "5",
        clean=clean,
        username=cfg.username,
        password=password,
        tls=cfg.tls.enabled,
        ca=cfg.tls.ca,
        cert=cfg.tls.cert,
        key=cfg.tls.key,
        reconnect_min_s=cfg.reconnect_min_s,
        reconnect_max_s=cfg.reconnect_max_s,
    )
    client.max_inflight_messages_set(64)
    # While the broker is away, replies wait in memory; bound that on a small board (a client
    # whose reply was dropped gets the stored final when it retries).
    client.max_queued_messages_set(10_000)
    return client


def packet_bytes(topic: str, payload: bytes, correlation: bytes | None, v5: bool) -> int:
    """An upper bound of a QoS 1 PUBLISH packet's size: fixed header (1 + up to 4 length bytes),
    topic, packet id, properties (length, Correlation Data), payload."""
    props = 4 + (3 + len(correlation) if correlation else 0) if v5 else 0
    return 1 + 4 + 2 + len(topic.encode("utf-8")) + 2 + props + len(payload)


class _Reply:
    """Reply address of one MQTT request."""

    transport = "mqtt"  # metrics label

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
    def __init__(
        self,
        dispatcher: Dispatcher,
        cfg: MqttConfig,
        status: dict[str, Any] | None = None,
        heartbeat: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
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
        self.client.on_publish = self._on_publish
        self._first = mqtt_common.FirstAnswer()
        self._subscribed = threading.Event()
        self.connected = threading.Event()
        self.connects = 0
        # What the broker accepts (MQTT 5 CONNACK properties; 3.1.1 brokers do not say).
        self.max_packet: int | None = None
        self.max_qos = 1
        self._pending: dict[int, str] = {}  # message id -> topic, to name a refused publish
        self._pending_lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self._closing = False  # we are closing the connection ourselves: nothing to warn about
        self._starting = False  # start() is waiting for the first answer and will explain a failure
        # Other device topics (OTA updates): filter -> callback, called on paho's thread.
        self.handlers: list[tuple[str, Callable[[mqtt.MQTTMessage], None]]] = []
        self.heartbeat = heartbeat if cfg.metrics_interval_s > 0 else None
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # -- lifecycle --

    def add_handler(self, topic_filter: str, handler: Callable[[mqtt.MQTTMessage], None]) -> None:
        """Subscribe `topic_filter` (QoS 1, again on every connect) and pass its messages to
        `handler` instead of the dispatcher. The handler runs on paho's thread: keep it thin."""
        self.handlers.append((topic_filter, handler))
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish a device message (QoS 1, or the broker's maximum); paho queues it while the
        broker is away. Never raises: a failure is logged."""
        try:
            self.client.publish(topic, payload, qos=self.max_qos, retain=retain)
        except (ValueError, TypeError) as exc:
            log.warning("cannot publish to %r: %s", topic, exc)

    def set_status(self, status: dict[str, Any]) -> None:
        """Replace the retained `online` status (e.g. a new bundle after an update)."""
        self.status = {"state": "online", "device": self.cfg.device, **status}
        if self.connected.is_set():
            self.publish(self.topics.status, json.dumps(self.status).encode(), retain=True)

    def start(self, wait_s: float = 10.0) -> None:
        """Connect and start the network thread. A refused login, a TLS/plain mismatch or a failed
        certificate check raises TransportError naming the cause; an unreachable broker is logged
        and retried in the background."""
        cfg = self.cfg
        tls = cfg.tls.enabled
        if self.heartbeat is not None and self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name="edge-llm-mqtt-metrics", daemon=True
            )
            self._heartbeat_thread.start()
        kwargs = mqtt_common.connect_args(self.v5, cfg.keepalive, cfg.session_expiry_s)
        unreachable = mqtt_common.connect(self.client, cfg.host, cfg.port, tls, **kwargs)
        if unreachable is not None:
            log.warning(
                "broker %s:%d unreachable (%s); retrying in the background", cfg.host, cfg.port, unreachable
            )
            self.client.connect_async(cfg.host, cfg.port, **kwargs)
            self.client.loop_start()
            return  # serve the other transports meanwhile; the subscriptions follow the connection
        self._starting = True
        self.client.loop_start()
        answered = self._first.event.wait(wait_s)
        self._starting = False
        if not answered:
            log.warning("no answer from broker %s:%d yet; still trying", cfg.host, cfg.port)
            return
        fatal = self._first.fatal(cfg.host, cfg.port, tls, cfg.username)
        if fatal is not None:
            self._closing = True
            self.client.loop_stop()
            self.client.disconnect()
            raise TransportError(fatal)
        # Return once the broker has our subscriptions, so a request sent right after is not missed.
        if not self._subscribed.wait(wait_s):
            log.warning("broker %s:%d has not confirmed our subscriptions yet", cfg.host, cfg.port)

    def stop(self, wait_s: float = 3.0) -> None:
        """Publish `offline` (retained), disconnect cleanly, stop the network thread."""
        self._closing = True
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(wait_s)
        if self.connected.is_set():
            offline = json.dumps({"state": "offline", "device": self.cfg.device})
            info = self.client.publish(self.topics.status, offline, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # not connected after all
                info.wait_for_publish(wait_s)
        self.client.disconnect()
        self.client.loop_stop()

    def _heartbeat_loop(self) -> None:
        """Publish the metrics summary (retained, so a fleet dashboard that subscribes later
        sees each board's latest at once) every `metrics_interval_s` while connected."""
        assert self.heartbeat is not None
        while not self._heartbeat_stop.wait(self.cfg.metrics_interval_s):
            if not self.connected.is_set():
                continue  # paho would queue it; a stale summary is worth nothing after reconnect
            try:
                summary = {"device": self.cfg.device, **self.heartbeat()}
                payload = json.dumps(summary, separators=(",", ":")).encode()
                size = packet_bytes(self.topics.metrics, payload, None, True)
                if self.max_packet is not None and size > self.max_packet:
                    log.warning("metrics summary (%d bytes) is over the broker's packet limit", len(payload))
                    continue
                self.client.publish(self.topics.metrics, payload, qos=self.max_qos, retain=True)
                self.stats["heartbeats"] += 1
            except Exception:  # the heartbeat must never take the transport down
                log.exception("publishing the metrics summary failed")

    # -- replies (any thread) --

    def publish_reply(self, topic: str, correlation: bytes | None, reply: dict[str, Any]) -> None:
        """Queue one reply; never raises. A reply the broker could not take is not published
        (it would cost the connection, and paho would send it again on every reconnect)."""
        payload = protocol.encode(reply)
        corr = correlation if self.v5 else None
        size = packet_bytes(topic, payload, corr, self.v5)
        if self.max_packet is not None and size > self.max_packet:
            self.stats["oversize"] += 1
            log.warning(
                "reply to %s for %r is %d bytes, over the broker's maximum packet size %d; not sent",
                topic, reply.get("id"), size, self.max_packet,
            )  # fmt: skip
            if reply.get("done") is not True or "error" in reply:
                return  # a chunk: the final still carries the whole text
            # The final itself: tell the client why instead of leaving it to time out.
            message = f"the reply is {size} bytes; the broker takes at most {self.max_packet} per message"
            payload = protocol.encode(protocol.error_reply(reply.get("id"), "internal", message))
            if packet_bytes(topic, payload, corr, self.v5) > self.max_packet:
                return
        props = None
        if corr is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
        # QoS 1 and paho's own queue: a reply made while the broker is away goes out on
        # reconnect. Chunks may go at QoS 0 (`chunk_qos`): the final holds the whole text.
        qos = min(self.cfg.chunk_qos if "seq" in reply else 1, self.max_qos)
        try:
            info = self.client.publish(topic, payload, qos=qos, properties=props)
        except (ValueError, TypeError) as exc:  # resolve() checked the topic; this is the last guard
            self.stats["publish_failed"] += 1
            log.warning("cannot publish a reply to %r: %s", topic, exc)
            return
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.stats["publish_failed"] += 1
            log.warning("reply to %s dropped: %d replies already wait for the broker", topic, 10_000)
        elif qos > 0:
            with self._pending_lock:
                if len(self._pending) > 20_000:  # only names for the log: never let them pile up
                    self._pending.clear()
                self._pending[info.mid] = topic

    # -- paho callbacks (network thread): thin --

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        first = not self._first.event.is_set()
        self._first.connack(reason)
        if reason.is_failure:
            if not first or self._first.refused not in mqtt_common.FATAL_REFUSALS:  # else start() raises
                log.warning("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            return
        self.connects += 1
        # The broker's limits, which a publish must respect (MQTT 5 CONNACK; 3.1.1 brokers do not
        # advertise theirs: `[mqtt] max_packet_bytes` stands in).
        advertised = getattr(props, "MaximumPacketSize", None) if props is not None else None
        limits = [n for n in (advertised, self.cfg.max_packet_bytes) if n]
        self.max_packet = min(limits) if limits else None
        self.max_qos = min(1, getattr(props, "MaximumQoS", 1)) if props is not None else 1
        # Subscribe every time: a broker restarted without persistence has forgotten us.
        client.subscribe(self.topics.subscriptions() + [(f, 1) for f, _ in self.handlers])
        status = json.dumps(self.status).encode()
        if (
            self.max_packet is not None
            and packet_bytes(self.topics.status, status, None, True) > self.max_packet
        ):
            status = json.dumps(
                {"state": "online", "device": self.cfg.device}
            ).encode()  # the capabilities do not fit
        client.publish(self.topics.status, status, qos=self.max_qos, retain=True)
        self.connected.set()
        log.info(
            "%s to %s:%d as %s (connect #%d, session present: %s)",
            "connected" if self.connects == 1 else "reconnected",
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            self.connects,
            getattr(flags, "session_present", None),
        )

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:  # e.g. an ACL that does not let this account read the request topic
            log.error("broker refused subscriptions: %s", ", ".join(refused))
        self._subscribed.set()

    def _on_publish(self, _client: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._pending_lock:
            topic = self._pending.pop(mid, "?")
        if getattr(reason, "is_failure", False):  # e.g. an ACL refusing the topic; paho will not resend
            self.stats["publish_refused"] += 1
            log.warning("broker refused the reply published to %s (%s); dropped", topic, reason)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _p: Any) -> None:
        explained = self._starting and not self._first.event.is_set()  # start() will say why
        self._first.closed()
        was_connected = self.connected.is_set()
        self.connected.clear()
        where = f"{self.cfg.host}:{self.cfg.port}"
        if self._closing or not getattr(reason, "is_failure", False):
            log.info("disconnected from %s", where)
        elif explained:
            log.debug("broker %s closed the connection before answering (%s)", where, reason)
        elif was_connected:
            log.warning("lost the connection to %s (%s); reconnecting", where, reason)
        else:  # paho only knows "Unspecified error" here; the usual causes:
            log.warning(
                "broker %s closed the connection before answering (%s; TLS on/off not matching the"
                " port? a client certificate missing?); retrying",
                where,
                reason,
            )

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for topic_filter, handler in self.handlers:
            if mqtt.topic_matches_sub(topic_filter, msg.topic):
                try:
                    handler(msg)
                except Exception:  # never let it kill paho's network thread
                    log.exception("failed to handle a message on %s", msg.topic)
                return
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None

        def resolve(reply_to: str | None) -> _Reply | None:
            # The MQTT 5 Response Topic wins; only without one does the `reply_to` field count.
            topic = response_topic or reply_to
            if not topic:
                return None
            problem = reply_topic_problem(topic, self.cfg.topic_prefix, self.cfg.reply_prefixes)
            if problem is not None:  # no address we may use: nobody to tell
                self.stats["bad_reply_topic"] += 1
                log.warning("message on %s: %s; not answered", msg.topic, problem)
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
