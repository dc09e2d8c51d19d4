"""Transport-independent half of the client SDK: request building, reply tracking, retries.

A `Connection` (socket or MQTT, see the sibling modules) moves bytes and routes each reply to the
inbox registered for its request id. `Client` / `AsyncClient` run one exchange per request:
send, collect chunks in seq order, return on the final. They retry with the SAME request id (so
the server deduplicates and never generates twice) when the server says `busy` (exponential
backoff with jitter), when the transport comes back after a loss, and when nothing has arrived for
`resend_after_s` (a reply lost with a broker, say). A stored final is then simply sent again.
That logic lives once, in `_Exchange` (no I/O); the two clients only wait, sleep and send for it.
Error classes come from `edge_llm.errors` (`error_from_reply` maps a reply's code to its class).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edge_llm.errors import EdgeLLMError, RequestTimeout, TransportError, error_from_reply
from edge_llm.protocol import Request
from edge_llm.structured import parse_response_format

log = logging.getLogger(__name__)

# Inbox items besides reply dicts.
RECONNECTED = "reconnected"  # the transport is back: send the request again
LOST = "lost"  # the transport dropped: reconnect (with backoff), then send again
SILENCE = "silence"  # (not from a transport) nothing arrived within `_Exchange.wait_s()`


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
    if "response_format" in fields:  # OpenAI's dict shape, checked here as the server would
        fields["response_format"] = parse_response_format(fields["response_format"])
        if fields["response_format"] is None:
            del fields["response_format"]
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
    retry_in: float | None = None  # wait this long, then send again (`busy`)
    resend: bool = False  # send again now (transport back, or silence)


class _Exchange:
    """One request's exchange, without I/O: the sync and async clients drive the same logic.

    Orders chunks, survives gaps and repeats, counts `busy` retries, keeps the deadline and the
    silence timer. After a server restart the regeneration (same id, same seed) repeats the
    chunks already yielded; one that repeats a seq with other text ends streaming, and the rest
    of the text comes from the final, which is authoritative.

    The driver sends the request, then loops: wait up to `wait_s()` for an inbox item (`SILENCE`
    when none came), `feed` it, and act on the `_Step`."""

    def __init__(self, request: Request, policy: RetryPolicy, timeout: float) -> None:
        self.request = request
        self.policy = policy
        self.deadline = time.monotonic() + timeout
        self.last = time.monotonic()  # when the request was last sent or a reply last came
        self.next_seq = 0
        self.emitted: list[str] = []
        self.gap = False  # a chunk went missing: stop streaming, take the rest from the final
        self.busy = 0

    def sent(self) -> None:
        self.last = time.monotonic()

    def wait_s(self) -> float:
        """How long to wait for the next item; raises RequestTimeout once the deadline passed."""
        now = time.monotonic()
        if now >= self.deadline:
            raise RequestTimeout(f"no final reply to {self.request.id} in time")
        return max(0.0, min(self.deadline, self.last + self.policy.resend_after_s) - now)

    def send_failed(self, exc: TransportError, attempt: int) -> float:
        """The transport is down: how long to back off before sending again (or RequestTimeout)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout(f"transport down until the timeout: {exc}") from None
        return min(left, self.policy.delay(attempt))

    def feed(self, item: Any) -> _Step:
        if item == SILENCE:
            return _Step([], resend=time.monotonic() >= self.last + self.policy.resend_after_s)
        if item in (RECONNECTED, LOST):
            return _Step([], resend=True)
        self.last = time.monotonic()
        return self._reply(item)

    def _reply(self, reply: dict[str, Any]) -> _Step:
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            if error.get("code") == "busy" and self.busy < self.policy.max_retries:
                self.busy += 1
                delay = self.policy.delay(self.busy - 1)
                return _Step([], retry_in=max(0.0, min(delay, self.deadline - time.monotonic())))
            return _Step([], error=error_from_reply(error))
        if reply.get("done") is True:
            text = str(reply.get("text", ""))
            sent = "".join(self.emitted)
            # The final text is authoritative; hand over whatever part of it was not streamed.
            rest = [text[len(sent) :]] if text.startswith(sent) and len(text) > len(sent) else []
            if not text.startswith(sent):  # yielded text cannot be taken back: say so, loudly
                log.warning(
                    "request %s: the streamed text is not a prefix of the final text", self.request.id
                )
            result = Result(
                id=str(reply.get("id")),
                text=text,
                finish_reason=str(reply.get("finish_reason")),
                usage=dict(reply.get("usage") or {}),
                session=reply.get("session"),
            )
            return _Step(rest, result=result)
        seq = reply.get("seq")
        if not isinstance(seq, int) or seq < 0:
            return _Step([])
        if seq < self.next_seq:  # a repeat: joined twice, or regenerated after a server restart
            if not self.gap and str(reply.get("delta", "")) != self.emitted[seq]:
                # The regeneration (same seed) streams something else from here on: appending
                # its later deltas would garble the text, so the rest comes from the final.
                log.warning("request %s: chunk %d came again with other text", self.request.id, seq)
                self.gap = True
            return _Step([])
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
        ex = _Exchange(request, self.retry, timeout if timeout is not None else self.timeout)
        inbox: queue.Queue[Any] = queue.Queue()
        self.connection.register(request.id, inbox.put)
        try:
            self._send(ex)
            while True:
                try:
                    item = inbox.get(timeout=ex.wait_s())
                except queue.Empty:
                    item = SILENCE
                step = ex.feed(item)
                yield from step.deltas
                if step.result is not None:
                    yield _Done(step.result)
                    return
                if step.error is not None:
                    raise step.error
                if step.retry_in is not None:
                    time.sleep(step.retry_in)
                if step.resend or step.retry_in is not None:
                    self._send(ex)
        finally:
            self.connection.unregister(request.id)

    def _send(self, ex: _Exchange) -> None:
        """Send (reconnecting with backoff while the transport is down)."""
        attempt = 0
        while True:
            try:
                self.connection.send(ex.request)
                ex.sent()
                return
            except TransportError as exc:
                time.sleep(ex.send_failed(exc, attempt))
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
        ex = _Exchange(request, self.retry, timeout if timeout is not None else self.timeout)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:  # called on the transport's thread
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        self.connection.register(request.id, put)
        try:
            await self._send(ex)
            while True:
                try:
                    item = await asyncio.wait_for(inbox.get(), ex.wait_s())
                except asyncio.TimeoutError:
                    item = SILENCE
                step = ex.feed(item)
                for delta in step.deltas:
                    yield delta
                if step.result is not None:
                    yield _Done(step.result)
                    return
                if step.error is not None:
                    raise step.error
                if step.retry_in is not None:
                    await asyncio.sleep(step.retry_in)
                if step.resend or step.retry_in is not None:
                    await self._send(ex)
        finally:
            self.connection.unregister(request.id)

    async def _send(self, ex: _Exchange) -> None:
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self.connection.send, ex.request)
                ex.sent()
                return
            except TransportError as exc:
                await asyncio.sleep(ex.send_failed(exc, attempt))
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
