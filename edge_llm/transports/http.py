"""OpenAI-compatible HTTP transport (extra `http`: uvicorn + starlette).

In: `POST /v1/chat/completions` and `POST /v1/completions` (OpenAI's bodies, gzip allowed),
`GET /v1/models`, `/healthz`, `/readyz`. Each completion body is mapped to a protocol request
(`openai_api`) and handed to `Dispatcher.handle` like a socket line or an MQTT message, so the
protocol's parser, the key gate and the scheduler treat it exactly as they treat the others.
Out: the final as one JSON object, or with `stream` true server-sent events (one
`chat.completion.chunk` per protocol chunk, a closing chunk with the finish reason, the usage
chunk when `stream_options.include_usage`, then `data: [DONE]`). Protocol errors become HTTP
statuses with OpenAI's error body (openai_api._ERRORS).

One asyncio loop on its own thread runs uvicorn (h11, no uvloop/httptools: pure Python, the
smallest footprint; see docs/protocol.md for the measured cost). Replies come from the
scheduler's worker thread through `call_soon_threadsafe`, as on the socket. A client that
disconnects cancels its request: every wait on a reply also waits for `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised without the extra
    from edge_llm.errors import ConfigError

    raise ConfigError(
        f"HTTP serving needs the 'http' extra ({exc.name} is missing): pip install 'edge-llm[http]'"
    ) from None

from edge_llm import protocol
from edge_llm.board import HttpConfig
from edge_llm.errors import EdgeLLMError, TransportError
from edge_llm.keys import bearer_key
from edge_llm.transports import openai_api
from edge_llm.transports.base import Dispatcher
from edge_llm.transports.openai_api import ApiError

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Exchange:
    """Reply `Address` of one HTTP request: replies land in an asyncio queue on the HTTP loop."""

    transport = "http"  # metrics label

    def __init__(self, loop: asyncio.AbstractEventLoop, rid: str, client: str) -> None:
        self.loop = loop
        self.key = f"http:{rid}"
        self.api_key: str | None = None
        self.client = client
        self.identity = "http"
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def send(self, reply: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, reply)


class HttpTransport:
    def __init__(
        self,
        dispatcher: Dispatcher,
        cfg: HttpConfig,
        model_id: str,
        ready: Callable[[], bool] = lambda: True,
        metrics: Any = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics  # edge_llm.metrics.Metrics: served at /metrics when it has a registry
        self.cfg = cfg
        self.model_id = cfg.model or model_id
        self.ready = ready
        self.host = cfg.host or "127.0.0.1"
        self.port = cfg.port
        self.scheme = "https" if cfg.tls.cert else "http"
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._model, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/readyz", self._readyz, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ],
            exception_handlers={ApiError: _api_error, 404: _not_found, 405: _not_allowed},
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    # -- lifecycle (caller's thread) --

    def start(self) -> None:
        # Bind here, so a port in use fails `serve` at once with our error (uvicorn would exit).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        self.port = sock.getsockname()[1]
        tls = self.cfg.tls
        config = uvicorn.Config(
            self.app,
            http="h11",
            loop="asyncio",
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,  # uvicorn's records go through the CLI's logging setup, not its own
            log_level="warning",
            server_header=False,
            ssl_certfile=tls.cert or None,
            ssl_keyfile=tls.key or None,
            ssl_ca_certs=tls.ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.ca else ssl.CERT_NONE,
            timeout_graceful_shutdown=5,
        )
        try:
            config.load()  # reads the TLS files now: a bad path fails here, not in the thread
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise TransportError(f"http.tls: {exc}") from None
        self._server = server = uvicorn.Server(config)

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException:  # SystemExit from uvicorn on a startup failure included
                log.exception("the HTTP server stopped")
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name="edge-llm-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            self.stop()
            raise TransportError(f"the HTTP server did not start on {self.host}:{self.port}")
        log.info("listening on %s", self.url)

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    # -- handlers (HTTP loop) --

    async def _models(self, req: HttpRequest) -> Response:
        self._authenticate(req)
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    def serve_model(self, name: str) -> None:
        """The bundle was swapped (reload, OTA): name it from now on, unless the profile fixes a name."""
        if not self.cfg.model:
            self.model_id = name

    async def _model(self, req: HttpRequest) -> Response:
        self._authenticate(req)
        name = req.path_params["model"]
        if name != self.model_id:
            raise ApiError(404, f"the model {name!r} does not exist", "model_not_found", "model")
        return JSONResponse(self._model_object())

    async def _metrics(self, _req: HttpRequest) -> Response:
        """Prometheus text (no key needed, like /healthz: scrapers carry none; bind to a private
        address where the figures are not for everyone)."""
        if self.metrics is None or self.metrics.registry is None:
            raise ApiError(404, "metrics need the 'metrics' extra: pip install 'edge-llm[metrics]'")
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def _healthz(self, _req: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})  # the process answers: alive (not necessarily ready)

    async def _readyz(self, _req: HttpRequest) -> Response:
        if self.ready():
            return JSONResponse({"status": "ready", "model": self.model_id})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def _chat(self, req: HttpRequest) -> Response:
        return await self._complete(req, chat=True)

    async def _completions(self, req: HttpRequest) -> Response:
        return await self._complete(req, chat=False)

    async def _complete(self, req: HttpRequest, chat: bool) -> Response:
        arrived = time.monotonic()
        try:
            key = self._authenticate(req)
        except ApiError:  # refused here, before the dispatcher: counted like its refusals
            self.dispatcher.refused(_Exchange.transport, "unauthorized", arrived)
            raise
        body = await self._read_json(req)
        mapped = openai_api.to_protocol(body, chat, self.model_id)
        rid = uuid.uuid4().hex
        peer = req.client.host if req.client is not None else "?"
        loop = asyncio.get_running_loop()
        # The in-flight limit per client groups by the OpenAI `user` when given, else by host.
        exchange = _Exchange(loop, rid, f"http:{mapped.user or peer}")
        exchange.api_key = key  # a disconnect's cancel must come from the request's owner (its key)
        payload = protocol.encode({"id": rid, **mapped.fields})
        self.dispatcher.handle(payload, lambda _reply_to: exchange, identity=exchange.identity, key=key)
        first = await self._next(req, exchange, rid)
        if first is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if "error" in first:
            raise openai_api.from_error_reply(first)
        if not mapped.stream:
            return JSONResponse(openai_api.completion_object(chat, rid, self.model_id, self.created, first))
        return _SseResponse(self, exchange, rid, chat, first, mapped.include_usage)

    # -- helpers --

    def _authenticate(self, req: HttpRequest) -> str | None:
        """The bearer key (None without one); 401 when the server has keys and this is not one."""
        key = bearer_key(req.headers.get("authorization", ""))
        gate = self.dispatcher.keys
        if gate is not None:
            try:
                gate.authenticate("http", key)
            except EdgeLLMError as exc:
                raise ApiError(401, str(exc), "invalid_api_key", type_="authentication_error") from None
        return key

    async def _read_json(self, req: HttpRequest) -> Any:
        """The body, gunzipped when `Content-Encoding: gzip`, within max_payload; 413 beyond."""
        limit = self.dispatcher.max_payload
        encoding = req.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise ApiError(415, f"Content-Encoding {encoding!r} is not supported (gzip is)", type_=None)
        length = req.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body is {length} bytes; the limit is {limit}", "too_large")
        # wbits 31: gzip framing. max_length bounds each step, so a small bomb cannot grow big.
        inflate = zlib.decompressobj(wbits=31) if encoding == "gzip" else None
        raw, data = 0, bytearray()
        try:
            async for part in req.stream():
                raw += len(part)
                if inflate is not None:
                    part = inflate.decompress(inflate.unconsumed_tail + part, limit + 1 - len(data))
                data += part
                if raw > limit * 64 or len(data) > limit:
                    raise ApiError(413, f"request body is over the limit of {limit} bytes", "too_large")
            if inflate is not None and not inflate.eof:
                raise ApiError(400, "the gzip body is truncated")
        except zlib.error as exc:
            raise ApiError(400, f"the body is not valid gzip: {exc}") from None
        except ClientDisconnect:  # gone before its body arrived: nothing was queued
            raise ApiError(499, "the client disconnected", "cancelled") from None
        try:
            return json.loads(bytes(data))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"the body is not JSON: {exc}") from None

    async def _next(self, req: HttpRequest, exchange: _Exchange, rid: str) -> dict[str, Any] | None:
        """The next reply, or None (and the request cancelled) when the client disconnects."""
        return await _next_or_disconnect(exchange, req.receive, lambda: self._cancel(rid, exchange.api_key))

    def _cancel(self, rid: str, key: str | None) -> None:
        log.info("HTTP client of %s disconnected: cancelling it", rid)
        cancel = protocol.encode({"cancel": rid})
        self.dispatcher.handle(cancel, lambda _r: None, identity="http", key=key)

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edge-llm"}


async def _next_or_disconnect(
    exchange: _Exchange, receive: Receive, on_disconnect: Callable[[], None]
) -> dict[str, Any] | None:
    get = asyncio.ensure_future(exchange.queue.get())
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (get, gone):
            if not task.done():
                task.cancel()
    if get in done:
        return get.result()
    on_disconnect()
    return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _SseResponse(Response):
    """Server-sent events for one streaming request; the request is cancelled if the client leaves."""

    def __init__(
        self,
        transport: HttpTransport,
        exchange: _Exchange,
        rid: str,
        chat: bool,
        first: dict[str, Any],
        include_usage: bool,
    ) -> None:
        super().__init__(media_type="text/event-stream", headers=_SSE_HEADERS)
        # A stream has no length: without one, h11 sends it chunked until the last body message.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.transport, self.exchange, self.rid = transport, exchange, rid
        self.chat, self.first, self.include_usage = chat, first, include_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t, chat, rid = self.transport, self.chat, self.rid

        def event(obj: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

        def chunk(**kw: Any) -> bytes:
            return event(openai_api.chunk_object(chat, rid, t.model_id, t.created, **kw))

        def render(reply: dict[str, Any], out: bytearray) -> bool:
            """Append the events for one protocol reply; True when it was the final."""
            if "seq" in reply:
                out += chunk(text=reply["delta"])
                return False
            if "error" in reply:  # after the stream began: OpenAI's in-stream error event
                out += event(openai_api.from_error_reply(reply).body())
                return True
            out += chunk(finish_reason=reply["finish_reason"])
            if self.include_usage:
                out += chunk(usage_of=reply.get("usage") or {})
            out += b"data: [DONE]\n\n"
            return True

        queue = self.exchange.queue
        # One watcher for the whole stream: a client that leaves cancels its request at once,
        # not only when the next token fails to send.
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            out = bytearray(chunk(text="", role=True) if chat else b"")  # OpenAI's first chunk: the role
            reply = self.first
            while True:
                final = render(reply, out)
                while not final and not queue.empty():  # what has piled up goes in one write
                    final = render(queue.get_nowait(), out)
                await send({"type": "http.response.body", "body": bytes(out), "more_body": not final})
                if final:
                    return
                out.clear()
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    t._cancel(rid, self.exchange.api_key)
                    return
                reply = get.result()
        finally:
            gone.cancel()


async def _api_error(_req: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _not_found(req: HttpRequest, _exc: Exception) -> Response:
    err = ApiError(404, f"no such endpoint: {req.method} {req.url.path}", "not_found")
    return JSONResponse(err.body(), status_code=404)


async def _not_allowed(req: HttpRequest, _exc: Exception) -> Response:
    err = ApiError(405, f"{req.method} is not allowed on {req.url.path}", "method_not_allowed")
    return JSONResponse(err.body(), status_code=405)
