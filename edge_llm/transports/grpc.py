"""gRPC transport (extra `grpc`): `LLMService.Chat`, one server-streaming RPC per request.

In: a `ChatRequest` (edge_llm/proto/llm.proto). It is turned into the protocol's request object
and handed to `Dispatcher.handle` as JSON bytes, so it is validated by the protocol parser like
every socket or MQTT message (no second validator here). Out: `ChatResponse` messages — content
deltas when the request streams, then one with `final` — or, for an error reply, the RPC ends
with the gRPC status of its protocol code (`STATUS`) and the code itself in the trailing metadata
`edge-llm-error-code`.

gRPC's own mechanisms map onto the protocol's: the call's deadline becomes `deadline_ms` (the
scheduler ends the request with `deadline` when it passes, as for any transport), and a call
the client cancels (or whose connection drops) sends the protocol's `cancel` for its id.

Identity: without an API key all gRPC callers share the identity `grpc`, as TCP socket clients
share `tcp`; each connection (its peer address) is one client for the in-flight limit. With a
keys file the call carries its key as HTTP does, in the `authorization: Bearer <key>` metadata
(or the request's `key` field); the key gate then names the request's owner (`key:NAME`) and
applies its rate limits, and a missing or wrong key ends the call UNAUTHENTICATED.

TLS: `[grpc.tls] cert`, `key` serve over TLS (the files checked with Python's ssl first, so a
bad or mismatched pair is a clear error at start-up, not a failed handshake later), and `ca`
requires client certificates signed by it, as `[http.tls]` does. A client over TLS:
`grpc.secure_channel(target, grpc.ssl_channel_credentials(ca[, key, cert]))` (docs/protocol.md).

Threads: the grpc server's pool runs each RPC on one thread, which blocks on the replies the
scheduler's worker puts in its queue; the pool is sized so that what the scheduler can hold
(queue + batch rows) fits, and a call beyond that is refused at once (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_llm import protocol
from edge_llm.errors import ConfigError, TransportError
from edge_llm.keys import bearer_key
from edge_llm.transports.base import Dispatcher

if TYPE_CHECKING:
    from edge_llm.board import ServerTlsConfig

try:
    import grpc

    from edge_llm.proto import llm_pb2, llm_pb2_grpc
except ImportError as exc:  # serve names the extra; the runtime's base install has no grpcio
    raise ConfigError(f"gRPC needs the `grpc` extra: pip install 'edge-llm[grpc]' ({exc})") from None

log = logging.getLogger(__name__)

IDENTITY = "grpc"
ERROR_CODE_KEY = "edge-llm-error-code"

# The gRPC status for each protocol error code. `busy` is UNAVAILABLE: the status gRPC clients
# (and their retry policies) treat as "try again", which is what busy means.
STATUS: dict[str, grpc.StatusCode] = {
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "too_long": grpc.StatusCode.OUT_OF_RANGE,
    "busy": grpc.StatusCode.UNAVAILABLE,
    "cancelled": grpc.StatusCode.CANCELLED,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
}

# Optional scalar fields copied as they are when set (proto3 `optional`: HasField tells).
_OPTIONAL = ("max_tokens", "top_k", "seed", "session")
# float32 on the wire (the guide's `float temperature`): rounded so 0.7 arrives as 0.7.
_FLOATS = ("temperature", "top_p", "repetition_penalty")


def request_dict(req: Any, remaining_s: float | None) -> dict[str, Any]:
    """The protocol request object for a ChatRequest (validation is the protocol parser's)."""
    out: dict[str, Any] = {"id": req.id or uuid.uuid4().hex}
    if req.prompt:
        out["prompt"] = req.prompt
    if req.messages:
        out["messages"] = [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.HasField("name") else {})}
            for m in req.messages
        ]
    for name in _OPTIONAL:
        if req.HasField(name):
            out[name] = getattr(req, name)
    for name in _FLOATS:
        if req.HasField(name):
            out[name] = round(getattr(req, name), 6)
    if req.stop:
        out["stop"] = list(req.stop)
    if req.stream:
        out["stream"] = True
    if req.ignore_eos:
        out["ignore_eos"] = True
    if req.HasField("response_format"):
        try:
            out["response_format"] = json.loads(req.response_format)
        except json.JSONDecodeError:
            out["response_format"] = req.response_format  # the parser refuses it with the id known
    # A call without a deadline reports a remaining time of centuries: that is no deadline.
    if remaining_s is not None and remaining_s * 1000 <= protocol.MAX_INT:
        out["deadline_ms"] = max(1, int(remaining_s * 1000))
    return out


def response(reply: dict[str, Any]) -> Any:
    """The ChatResponse for a protocol chunk or final reply (errors end the call instead)."""
    if not protocol.is_final(reply):
        return llm_pb2.ChatResponse(id=reply["id"], content=reply["delta"], seq=reply["seq"])
    known = llm_pb2.Usage.DESCRIPTOR.fields_by_name
    usage = {k: v for k, v in (reply.get("usage") or {}).items() if k in known}
    final = llm_pb2.Final(
        text=reply["text"],
        finish_reason=reply["finish_reason"],
        usage=llm_pb2.Usage(**usage),
        session=reply.get("session"),
    )
    return llm_pb2.ChatResponse(id=reply["id"], final=final)


class _Reply:
    """Reply address of one RPC: replies go into the queue its handler thread reads."""

    transport = "grpc"

    def __init__(self, key: str, client: str) -> None:
        self.key = key
        self.client = client
        self.identity = IDENTITY
        self.replies: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def send(self, reply: dict[str, Any]) -> None:
        self.replies.put(reply)


def metadata_key(metadata: Any) -> str | None:
    """The API key of the call's `authorization: Bearer <key>` metadata, read as HTTP's header."""
    for name, value in metadata or ():
        if name.lower() == "authorization" and isinstance(value, str) and (key := bearer_key(value)):
            return key
    return None


class _Service(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._ids = itertools.count(1)

    def Chat(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # gRPC names it
        remaining = context.time_remaining()
        deadline_at = time.monotonic() + remaining if remaining is not None else None
        fields = request_dict(request, remaining)
        address = _Reply(f"grpc:{next(self._ids)}", f"grpc:{context.peer()}")
        key = metadata_key(context.invocation_metadata())
        done = threading.Event()

        def on_end() -> None:
            """The RPC is over: finished, cancelled by the client, or past its deadline."""
            if done.is_set():
                return
            if deadline_at is not None and time.monotonic() >= deadline_at - 0.01:
                return  # its deadline_ms ends it on the server as `deadline`, not `cancelled`
            cancel = protocol.encode({"cancel": fields["id"]})
            self.dispatcher.handle(cancel, lambda _to: address, accept="cancel", identity=IDENTITY, key=key)

        context.add_callback(on_end)
        self.dispatcher.handle(protocol.encode(fields), lambda _to: address, identity=IDENTITY, key=key)
        while True:
            try:
                reply = address.replies.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():  # the call is over (on_end sent a cancel, or its
                    return  # deadline_ms ends it): nobody is left to read what still comes
                continue
            if not protocol.is_final(reply):
                yield response(reply)
                continue
            done.set()
            error = reply.get("error")
            if error is None:
                yield response(reply)
                return
            code = error["code"]
            context.set_trailing_metadata(((ERROR_CODE_KEY, code),))
            context.abort(STATUS.get(code, grpc.StatusCode.INTERNAL), error["message"])


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransportError(f"grpc.tls: cannot read {what} {path}: {exc.strerror or exc}") from None


def server_credentials(tls: ServerTlsConfig) -> grpc.ServerCredentials:
    """gRPC server credentials from `[grpc.tls]` (cert and key set; ca: client certificates)."""
    # `~` expanded once: grpc and the ssl check below must read the same files.
    cert_path, key_path = str(Path(tls.cert).expanduser()), str(Path(tls.key).expanduser())
    ca_path = str(Path(tls.ca).expanduser()) if tls.ca else ""
    cert, key = _read_pem(cert_path, "cert"), _read_pem(key_path, "key")
    ca = _read_pem(ca_path, "ca") if ca_path else None
    try:  # grpc says nothing useful about bad PEM until a handshake fails: ask ssl now
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        if ca_path:
            ctx.load_verify_locations(ca_path)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise TransportError(f"grpc.tls: {cert_path} / {key_path} / {ca_path or '-'}: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class GrpcTransport:
    def __init__(
        self,
        dispatcher: Dispatcher,
        host: str,
        port: int,
        max_calls: int = 32,
        tls: ServerTlsConfig | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.host = host
        self.max_calls = max_calls
        max_message = 4 * dispatcher.max_payload  # protobuf is smaller than the JSON it becomes
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=max_calls, thread_name_prefix="edge-llm-grpc"),
            maximum_concurrent_rpcs=max_calls,
            options=[("grpc.max_receive_message_length", max_message)],
        )
        llm_pb2_grpc.add_LLMServiceServicer_to_server(_Service(dispatcher), self.server)
        self.tls = tls is not None and bool(tls.cert)
        creds = server_credentials(tls) if tls is not None and tls.cert else None
        try:
            if creds is not None:
                self.port = self.server.add_secure_port(f"{host}:{port}", creds)
            else:
                self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise TransportError(f"grpc: cannot listen on {host}:{port}: {exc}") from None
        if self.port == 0:  # grpc reports a failed bind as port 0 in some versions
            raise TransportError(f"grpc: cannot listen on {host}:{port} (in use?)")

    def start(self) -> None:
        self.server.start()
        log.info("gRPC LLMService on %s:%d%s", self.host, self.port, " (TLS)" if self.tls else "")

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait(grace_s + 1.0)
