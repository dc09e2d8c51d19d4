"""edge-llm client SDK: talk to `edge-llm serve` over its local socket or MQTT.

    from edge_llm.client import SocketClient, MqttClient
    with SocketClient("/run/edge-llm.sock") as c:
        print(c.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=64).text)
        for delta in c.stream(messages=[...]):
            print(delta, end="")

    async with AsyncMqttClient("127.0.0.1", 1883, device="board-1") as c:
        result = await c.generate(messages=[...], session="chat-42")

`generate()` returns a `Result` (text, finish_reason, usage, session); `stream()` yields text
deltas and sets `.result` at the end. Errors raise the `edge_llm.errors` class of their code
(BusyError, RequestError, ContextLengthError, CancelledError, DeadlineError; `ServerError` for
internal ones; `RequestTimeout` when no final came in time). Retries (busy, transport loss,
silence) reuse the request id, so the server never generates a request twice.
"""

from __future__ import annotations

from typing import Any

from edge_llm.client._core import AsyncClient, AsyncStream, Client, Result, RetryPolicy, Stream, build_request
from edge_llm.client._socket import SocketConnection
from edge_llm.errors import RequestTimeout, ServerError  # defined with the other errors; public here too

_CLIENT_KW = ("timeout", "retry")


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    client = {k: kwargs.pop(k) for k in _CLIENT_KW if k in kwargs}
    return client, kwargs


def SocketClient(path: str | None = None, *, tcp_port: int | None = None, **kwargs: Any) -> Client:
    """Sync client over the Unix socket at `path` or 127.0.0.1:`tcp_port`. Connects now."""
    client_kw, conn_kw = _split(kwargs)
    return Client(SocketConnection(path, tcp_port=tcp_port, **conn_kw), **client_kw)


def AsyncSocketClient(path: str | None = None, *, tcp_port: int | None = None, **kwargs: Any) -> AsyncClient:
    """asyncio client over a Unix socket or 127.0.0.1 TCP. Connects on first use (or `async with`)."""
    client_kw, conn_kw = _split(kwargs)
    return AsyncClient(SocketConnection(path, tcp_port=tcp_port, **conn_kw), **client_kw)


def MqttClient(host: str = "127.0.0.1", port: int = 1883, **kwargs: Any) -> Client:
    """Sync client over MQTT (`device=` or `fleet=True`; auth, TLS, protocol_version "5"/"3.1.1")."""
    from edge_llm.client._mqtt import MqttConnection  # paho only when MQTT is used

    client_kw, conn_kw = _split(kwargs)
    return Client(MqttConnection(host, port, **conn_kw), **client_kw)


def AsyncMqttClient(host: str = "127.0.0.1", port: int = 1883, **kwargs: Any) -> AsyncClient:
    """asyncio client over MQTT; same options as `MqttClient`."""
    from edge_llm.client._mqtt import MqttConnection

    client_kw, conn_kw = _split(kwargs)
    return AsyncClient(MqttConnection(host, port, **conn_kw), **client_kw)


__all__ = [
    "AsyncClient",
    "AsyncMqttClient",
    "AsyncSocketClient",
    "AsyncStream",
    "Client",
    "MqttClient",
    "RequestTimeout",
    "Result",
    "RetryPolicy",
    "ServerError",
    "SocketClient",
    "SocketConnection",
    "Stream",
    "build_request",
]
