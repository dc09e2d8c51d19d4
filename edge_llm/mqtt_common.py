"""paho-mqtt set-up shared by the runtime's MQTT transport and the client SDK (one copy of it).

In: connection settings as plain values. Out: a configured, unconnected paho client
(`new_client`), the CONNECT arguments (`connect_args`), and at start-up either a connection or
a `TransportError` that names the likely cause: a login the broker refused, TLS switched off
against a TLS-only listener or on against a plain one, a certificate that failed verification.
Without this paho only reports "Unspecified error" and reconnects forever (issue 11, item 6).

Light on purpose: paho and the standard library only (no numpy, no onnxruntime), so a sensor
node that only sends prompts can import the SDK.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_llm.errors import ConfigError, TransportError

# CONNACK refusals that retrying will not fix, with what they most likely mean.
FATAL_REFUSALS = {
    "Bad user name or password": "bad user name or password (check the username and password)",
    # Mosquitto answers a wrong password with "Not authorized" too (MQTT 5).
    "Not authorized": "not authorised (check the username and password, or the client certificate)",
    "Client identifier not valid": "the broker does not accept this client id",
    "Unsupported protocol version": "the broker does not speak this MQTT version (try protocol 3.1.1)",
    "Banned": "this client is banned by the broker",
    "Bad authentication method": "the broker does not support this authentication method",
    "Retain not supported": "the broker does not allow retained messages (the device status needs them)",
}


def read_password(path: str | None, option: str) -> str | None:
    """The MQTT password in the file `path` (None: no file), stripped; a file that cannot be read
    is a ConfigError naming `option`."""
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def new_client(
    client_id: str,
    *,
    v5: bool,
    clean: bool,
    username: str | None = None,
    password: str | None = None,
    tls: bool = False,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    reconnect_min_s: float = 1.0,
    reconnect_max_s: float = 30.0,
) -> mqtt.Client:
    """A paho client with protocol, login, TLS, reconnect backoff and TCP_NODELAY. Not connected.
    `clean` is the 3.1.1 clean-session flag (MQTT 5 passes clean_start at connect instead)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
    )
    if username:
        client.username_pw_set(username, password or None)
    if tls:
        try:
            client.tls_set(
                ca_certs=ca or None, certfile=cert or None, keyfile=key or None, cert_reqs=ssl.CERT_REQUIRED
            )
        except (OSError, ssl.SSLError, ValueError) as exc:  # a missing or unreadable CA, cert or key file
            raise ConfigError(f"mqtt TLS files: {exc}") from None
    client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
    no_delay(client)
    return client


def connect_args(v5: bool, keepalive: int, session_expiry_s: int) -> dict[str, Any]:
    """Keyword arguments for `client.connect`: a persistent MQTT 5 session that expires after
    `session_expiry_s` (3.1.1 has the clean-session flag set in `new_client`)."""
    if not v5:
        return {"keepalive": keepalive}
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return {"keepalive": keepalive, "clean_start": False, "properties": props}


def no_delay(client: mqtt.Client) -> None:
    """Send each MQTT packet at once (TCP_NODELAY) on every socket the client opens.

    Streamed replies are many small QoS 1 packets: with Nagle's algorithm a packet waits for the
    ACK of the previous one, which the peer delays up to 40 ms (measured here: QoS 1 round trips
    to the local mosquitto with a 42 ms tail, 0.5 ms with TCP_NODELAY)."""

    def on_open(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(AttributeError, OSError):  # a websocket wrapper has no such option
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = on_open


class FirstAnswer:
    """How the broker answered the first connection attempt: a refusal, a connection closed
    before any CONNACK (what a TLS/plain mismatch or a missing client certificate looks like),
    or success. Fed from paho's callbacks (network thread); read by whoever waits in `connect`."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.refused: str | None = None
        self.closed_early = False

    def connack(self, reason: Any) -> None:
        if not self.event.is_set():
            self.refused = str(reason) if reason.is_failure else None
            self.event.set()

    def closed(self) -> None:
        if not self.event.is_set():
            self.closed_early = True
            self.event.set()

    def fatal(self, host: str, port: int, tls: bool, username: str | None) -> str | None:
        """The plain-words cause when retrying cannot help, else None. May probe the port (seconds):
        call it from the starting thread, never from a paho callback."""
        if self.refused in FATAL_REFUSALS:
            cause = FATAL_REFUSALS[self.refused]
            if not username and self.refused in ("Not authorized", "Bad user name or password"):
                cause = (
                    "not authorised: no username was given, and the broker does not accept anonymous clients"
                )
            return f"broker {host}:{port} refused the login: {cause}"
        if self.closed_early:
            return closed_before_answer(host, port, tls)
        return None


def connect(client: mqtt.Client, host: str, port: int, tls: bool, **kwargs: Any) -> OSError | None:
    """`client.connect(...)`. A TLS problem raises TransportError naming the likely cause; an
    unreachable broker is returned (the caller retries in the background or gives up)."""
    try:
        client.connect(host, port, **kwargs)
    except ssl.SSLCertVerificationError as exc:
        raise TransportError(
            f"TLS with {host}:{port}: the broker's certificate failed verification ({exc.verify_message});"
            " check the CA certificate (`[mqtt.tls] ca`, `--ca`) and that the host name matches it"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        if tls and not isinstance(exc, ConnectionRefusedError) and speaks_plain_mqtt(host, port):
            raise TransportError(
                f"TLS is on, but the broker at {host}:{port} speaks plain MQTT (not TLS) on that port:"
                " turn TLS off (`[mqtt.tls] enabled = false`, no `--ca`) or use the broker's TLS port"
                " (usually 8883)"
            ) from None
        if isinstance(exc, ssl.SSLError):
            raise TransportError(f"TLS with {host}:{port} failed: {exc}") from None
        return exc
    return None


def closed_before_answer(host: str, port: int, tls: bool) -> str:
    if not tls and speaks_tls(host, port):
        return (
            f"TLS is off, but the broker at {host}:{port} expects TLS on that port (it closed the plain"
            " MQTT connection without answering): turn TLS on (`[mqtt.tls] enabled = true` with its"
            " `ca`, or `--ca` for `edge-llm send`) or use the broker's plain port (usually 1883)"
        )
    if tls:
        return (
            f"the broker at {host}:{port} closed the TLS connection before answering: it probably"
            " requires a client certificate (`[mqtt.tls] cert` and `key`, or `--cert`/`--key`) or"
            " refuses this one"
        )
    return f"the broker at {host}:{port} closed the connection without answering the MQTT CONNECT"


def speaks_tls(host: str, port: int, timeout: float = 3.0) -> bool:
    """Does `host:port` answer a TLS handshake? (Certificates are not checked: this only tells a
    TLS listener from a plain one.)"""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout) as raw, ctx.wrap_socket(raw):
            return True
    except ssl.SSLEOFError:
        return False
    except ssl.SSLError as exc:  # an alert from the peer (e.g. "certificate required") is TLS talking
        return "ALERT" in str(exc).upper()
    except OSError:
        return False


def speaks_plain_mqtt(host: str, port: int, timeout: float = 3.0) -> bool:
    """Does `host:port` answer a plain MQTT 3.1.1 CONNECT with a CONNACK (even a refusal)?"""
    client_id = f"edge-llm-probe-{uuid.uuid4().hex[:8]}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(bytes([0x10, len(body)]) + body)
            return sock.recv(1) == b"\x20"
    except OSError:
        return False
