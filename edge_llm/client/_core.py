"""Transport-independent half of the client SDK: request building, reply tracking, retries.

A `Connection` (socket or MQTT, see the sibling modules) moves bytes and routes each reply to the
inbox registered for its request id. `Client` / `AsyncClient` run one exchange per request:
send, collect chunks in seq order, return on the final. They retry with the SAME request id (so
the server deduplicates and never generates twice) when the server says `busy` (exponential
backoff with jitter), when the transport comes back after a loss, and when nothing has arrived for
`resend_after_s` (a reply lost with a broker, say). A stored final is then simply sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edge_llm.errors import (
    BusyError,
    CancelledError,
    ContextLengthError,
    DeadlineError,
    EdgeLLMError,
    RateLimitedError,
    RequestError,
    TransportError,
    UnauthorizedError,
)
from edge_llm.protocol import Request

# Inbox items besides reply dicts.
RECONNECTED = "reconnected"  # the transport is back: send the request again
LOST = "lost"  # the transport dropped: reconnect (with backoff), then send again


class RequestTimeout(TransportError):
    """No final reply within the client's timeout."""

    code = "timeout"


class ServerError(EdgeLLMError):
    """The server failed the request (`internal`) or answered with a code this client does not know."""

    code = "internal"


_ERRORS: dict[str, type[EdgeLLMError]] = {
    "bad_request": RequestError,
    "too_long": ContextLengthError,
    "busy": BusyError,
    "cancelled": CancelledError,
    "deadline": DeadlineError,
    "unauthorized": UnauthorizedError,
}


def error_for(error: dict[str, Any]) -> EdgeLLMError:
    code = str(error.get("code", "internal"))
    if code == "rate_limited":
        retry = error.get("retry_after_s")
        return RateLimitedError(str(error.get("message", "")), float(retry) if retry else 1.0)
    exc = _ERRORS.get(code, ServerError)(str(error.get("message", "")))
    if type(exc) is ServerError and code != "internal":
        exc.code = code
    return exc


@dataclass(frozen=True)
class Result:
    id: str
    text: str
    finish_reason: str
    usage: dict[str, Any]
    session: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6  # `busy` answers tolerated per request
    backoff_s: float = 0.2  # first delay; doubles per attempt
    backoff_max_s: float = 5.0
    resend_after_s: float = 10.0  # silence this long: send the request again (same id)

    def delay(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so clients that were
        refused together do not come back together."""
        d = min(self.backoff_max_s, self.backoff_s * (2**attempt))
        return d / 2 + random.uniform(0, d / 2)


class Connection(Protocol):
    """What a client needs from a transport (all methods thread-safe)."""

    def connect(self) -> None: ...
    def register(self, request_id: str, put: Callable[[Any], None]) -> None: ...
    def unregister(self, request_id: str) -> None: ...
    def send(self, request: Request) -> None: ...
    def send_cancel(self, request_id: str) -> None: ...
    def close(self) -> None: ...


def build_request(
    prompt: str | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    *,
    request_id: str | None = None,
    stream: bool = False,
    **fields: Any,
) -> Request:
    """A protocol `Request`; `fields` are the other request fields (max_tokens, session, ...)."""
    known = {f.name for f in dataclasses.fields(Request)} - {"id", "messages", "prompt", "stream"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown request field(s): {', '.join(unknown)}")
    if isinstance(fields.get("stop"), str):
        fields["stop"] = (fields["stop"],)
    elif fields.get("stop") is not None:
        fields["stop"] = tuple(fields["stop"])
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("temperature", 0.0) > 0 and "seed" not in fields:
        # Fix the seed now: if a retry has to generate again (the server was restarted mid-way),
        # it produces the same text that was already streamed.
        fields["seed"] = random.randrange(2**31)
    return Request(
        id=request_id or uuid.uuid4().hex,
        messages=tuple(dict(m) for m in messages) if messages is not None else None,
        prompt=prompt,
        stream=stream,
        **fields,
    )


@dataclass
class _Step:
    deltas: list[str]
    result: Result | None = None
    error: EdgeLLMError | None = None
    retry_in: float | None = None


class _Tracker:
    """Follows one request's replies: orders chunks, survives gaps and repeats, counts retries."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.next_seq = 0
        self.emitted: list[str] = []
        self.gap = False  # a chunk went missing: stop streaming, take the rest from the final
        self.busy = 0

    def feed(self, reply: dict[str, Any]) -> _Step:
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            if error.get("code") == "busy" and self.busy < self.policy.max_retries:
                self.busy += 1
                return _Step([], retry_in=self.policy.delay(self.busy - 1))
            return _Step([], error=error_for(error))
        if reply.get("done") is True:
            text = str(reply.get("text", ""))
            sent = "".join(self.emitted)
            # The final text is authoritative; hand over whatever part of it was not streamed.
            rest = [text[len(sent) :]] if text.startswith(sent) and len(text) > len(sent) else []
            result = Result(
                id=str(reply.get("id")),
                text=text,
                finish_reason=str(reply.get("finish_reason")),
                usage=dict(reply.get("usage") or {}),
                session=reply.get("session"),
            )
            return _Step(rest, result=result)
        seq = reply.get("seq")
        if not isinstance(seq, int) or seq < self.next_seq:
            return _Step([])  # a repeat (resent after a reconnect)
        if seq > self.next_seq or self.gap:
            self.gap = True
            return _Step([])
        self.next_seq += 1
        delta = str(reply.get("delta", ""))
        self.emitted.append(delta)
        return _Step([delta])


class _Done:
    def __init__(self, result: Result) -> None:
        self.result = result


class Client:
    """Synchronous client over one connection; safe to share between threads."""

    def __init__(self, connection: Connection, *, timeout: float = 120.0, retry: RetryPolicy | None = None):
        self.connection = connection
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.connection.connect()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **fields: Any) -> Result:
        """Send one request and return its final `Result`; raise the error a failed one got."""
        request = build_request(prompt, stream=False, **fields)
        for item in self._exchange(request, timeout):
            if isinstance(item, _Done):
                return item.result
        raise AssertionError("unreachable")

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **fields: Any) -> Stream:
        """Send one streaming request; iterate the returned `Stream` for text deltas."""
        request = build_request(prompt, stream=True, **fields)
        return Stream(self, request, self._exchange(request, timeout))

    def cancel(self, request_id: str) -> None:
        self.connection.send_cancel(request_id)

    def _exchange(self, request: Request, timeout: float | None) -> Iterator[str | _Done]:
        policy, conn = self.retry, self.connection
        inbox: queue.Queue[Any] = queue.Queue()
        tracker = _Tracker(policy)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        conn.register(request.id, inbox.put)
        try:
            last = self._send(request, deadline)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise RequestTimeout(f"no final reply to {request.id} in time")
                try:
                    item = inbox.get(timeout=max(0.0, min(deadline, last + policy.resend_after_s) - now))
                except queue.Empty:
                    if time.monotonic() >= last + policy.resend_after_s:
                        last = self._send(request, deadline)
                    continue
                if item in (RECONNECTED, LOST):
                    last = self._send(request, deadline)
                    continue
                last = time.monotonic()
                step = tracker.feed(item)
                yield from step.deltas
                if step.result is not None:
                    yield _Done(step.result)
                    return
                if step.error is not None:
                    raise step.error
                if step.retry_in is not None:
                    time.sleep(max(0.0, min(step.retry_in, deadline - time.monotonic())))
                    last = self._send(request, deadline)
        finally:
            conn.unregister(request.id)

    def _send(self, request: Request, deadline: float) -> float:
        """Send (reconnecting with backoff while the transport is down); return the send time."""
        attempt = 0
        while True:
            try:
                self.connection.send(request)
                return time.monotonic()
            except TransportError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout(f"transport down until the timeout: {exc}") from None
                time.sleep(min(left, self.retry.delay(attempt)))
                attempt += 1


class Stream:
    """Iterate for text deltas; `result` holds the final `Result` once iteration ends."""

    def __init__(self, client: Client, request: Request, items: Iterator[str | _Done]) -> None:
        self.id = request.id
        self.result: Result | None = None
        self._client = client
        self._items = items

    def __iter__(self) -> Iterator[str]:
        for item in self._items:
            if isinstance(item, _Done):
                self.result = item.result
            else:
                yield item

    def cancel(self) -> None:
        self._client.cancel(self.id)


class AsyncClient:
    """asyncio client: the same exchange, with replies bridged from the transport's thread."""

    def __init__(self, connection: Connection, *, timeout: float = 120.0, retry: RetryPolicy | None = None):
        self.connection = connection
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._connected = False

    async def connect(self) -> AsyncClient:
        if not self._connected:
            await asyncio.to_thread(self.connection.connect)
            self._connected = True
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.connection.close)

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **fields: Any
    ) -> Result:
        request = build_request(prompt, stream=False, **fields)
        async for item in self._exchange(request, timeout):
            if isinstance(item, _Done):
                return item.result
        raise AssertionError("unreachable")

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **fields: Any
    ) -> AsyncStream:
        request = build_request(prompt, stream=True, **fields)
        return AsyncStream(self, request, self._exchange(request, timeout))

    async def cancel(self, request_id: str) -> None:
        await asyncio.to_thread(self.connection.send_cancel, request_id)

    async def _exchange(self, request: Request, timeout: float | None) -> AsyncIterator[str | _Done]:
        await self.connect()
        policy, conn = self.retry, self.connection
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:  # called on the transport's thread
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        tracker = _Tracker(policy)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        conn.register(request.id, put)
        try:
            last = await self._send(request, deadline)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise RequestTimeout(f"no final reply to {request.id} in time")
                try:
                    wait = max(0.0, min(deadline, last + policy.resend_after_s) - now)
                    item = await asyncio.wait_for(inbox.get(), wait)
                except asyncio.TimeoutError:
                    if time.monotonic() >= last + policy.resend_after_s:
                        last = await self._send(request, deadline)
                    continue
                if item in (RECONNECTED, LOST):
                    last = await self._send(request, deadline)
                    continue
                last = time.monotonic()
                step = tracker.feed(item)
                for delta in step.deltas:
                    yield delta
                if step.result is not None:
                    yield _Done(step.result)
                    return
                if step.error is not None:
                    raise step.error
                if step.retry_in is not None:
                    await asyncio.sleep(max(0.0, min(step.retry_in, deadline - time.monotonic())))
                    last = await self._send(request, deadline)
        finally:
            conn.unregister(request.id)

    async def _send(self, request: Request, deadline: float) -> float:
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self.connection.send, request)
                return time.monotonic()
            except TransportError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout(f"transport down until the timeout: {exc}") from None
                await asyncio.sleep(min(left, self.retry.delay(attempt)))
                attempt += 1


class AsyncStream:
    """`async for delta in stream`; `result` holds the final `Result` once iteration ends."""

    def __init__(self, client: AsyncClient, request: Request, items: AsyncIterator[str | _Done]) -> None:
        self.id = request.id
        self.result: Result | None = None
        self._client = client
        self._items = items

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        while True:
            item = await self._items.__anext__()
            if isinstance(item, _Done):
                self.result = item.result
                continue
            return item

    async def cancel(self) -> None:
        await self._client.cancel(self.id)
