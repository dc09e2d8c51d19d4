"""The seam between transports and the scheduler: parse, submit, reply.

In: one message's bytes and a way to reach its sender (`resolve(reply_to) -> Address`). Out:
`Scheduler.submit` / `cancel` calls, with a sink that turns scheduler events into protocol replies
for that address; or an immediate error reply (bad input, busy, and with a `KeyGate`:
unauthorized, rate_limited). Nothing here blocks: parsing is bounded by `max_payload`, the gate
is a dictionary lookup and `submit` never waits, so a transport callback stays thin.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, Protocol

from edge_llm import protocol
from edge_llm.errors import EdgeLLMError
from edge_llm.keys import KeyGate, usage_tokens  # stdlib only: cheap for every transport
from edge_llm.protocol import Cancel, ProtocolError, Request

log = logging.getLogger(__name__)


class Address(Protocol):
    """Where replies for one request go."""

    key: str  # equal keys = same destination: a redelivered request to it is not answered twice
    client: str  # groups requests for the per-client in-flight limit
    identity: str  # who is asking, when the reply address is what names them (MQTT plain topic)
    transport: str  # "socket", "mqtt", "grpc", ...: the label metrics count requests under

    def send(self, reply: dict[str, Any]) -> None:
        """Queue one reply object for sending; never blocks, never raises."""
        ...


Resolve = Callable[[str | None], Address | None]
# Sees every final reply the dispatcher sends: (transport, final or error event, seconds from the
# message's arrival to the reply). Metrics install one.
Observer = Callable[[str, protocol.Event, float], None]


class Submitter(Protocol):
    """What a transport needs from the scheduler."""

    def submit(
        self, request: Request, sink: Any, client: str = "", reply_key: str | None = None, identity: str = ""
    ) -> Any: ...

    def cancel(self, request_id: str, identity: str = "") -> bool: ...


class Dispatcher:
    def __init__(
        self,
        scheduler: Submitter,
        max_payload: int = protocol.DEFAULT_MAX_PAYLOAD,
        keys: KeyGate | None = None,
    ) -> None:
        """`keys`: when given, every request must map to a key entry and is held to its limits."""
        self.scheduler = scheduler
        self.max_payload = max_payload
        self.keys = keys
        self.stats: Counter[str] = Counter()
        self.observer: Observer | None = None

    def handle(
        self,
        payload: bytes,
        resolve: Resolve,
        accept: Literal["any", "cancel"] = "any",
        identity: str | None = None,
        key: str | None = None,
    ) -> None:
        """Handle one inbound message. `resolve(reply_to)` gives the reply address (the request's
        `reply_to` field is passed for transports that route by it) or None if there is none.
        `identity`: who sent it, when the transport knows (`uid:N` for a socket peer,
        `mqtt-user:NAME` for an MQTT per-user topic); None: the reply address's identity. A
        request belongs to its identity — the API key's name when a key was given — and only that
        identity joins, replays or cancels it. `key`: an API key the transport carried (HTTP
        bearer); else the request's `key` field."""
        arrived = time.monotonic()
        try:
            message = protocol.parse_message(payload, self.max_payload)
            if accept == "cancel" and not isinstance(message, Cancel):
                raise ProtocolError(
                    'this topic takes cancel messages only: {"cancel": "<id>"}',
                    message.id,
                    message.reply_to,
                )
        except ProtocolError as exc:
            self.stats["bad_request"] += 1
            address = resolve(exc.reply_to)
            if address is None:
                log.warning("dropped a bad message with no reply address: %s", exc)
                return
            self._observe(address, protocol.Event("error", exc.request_id or "", code="bad_request"), arrived)
            address.send(protocol.error_reply(exc.request_id, "bad_request", str(exc)))
            return
        if isinstance(message, Cancel):
            self.stats["cancel"] += 1
            who = identity
            given = key if key is not None else message.key
            owner = self.keys.owner(given) if self.keys is not None and given is not None else None
            if owner is not None:  # a request made with a key belongs to that key (see below)
                who = f"key:{owner}"
            if who is None:  # the reply topic it names says whose request it may cancel
                sender = resolve(message.reply_to)
                who = sender.identity if sender is not None else None
            if who is None:
                log.warning("cancel of %s names no reply topic, so nobody's request: ignored", message.id)
            elif not self.scheduler.cancel(message.id, identity=who):
                log.info("cancel of %s: no request of this client by that id in flight", message.id)
            return
        address = resolve(message.reply_to)
        if address is None:
            self.stats["no_reply_address"] += 1
            log.warning(
                "request %s has no reply address (MQTT: response topic or reply_to); dropped", message.id
            )
            return
        self.stats["request"] += 1
        send = address.send
        who = identity if identity is not None else address.identity
        grant = None
        if self.keys is not None:
            given = key if key is not None else message.key
            try:
                grant = self.keys.admit(identity or "", given)
            except EdgeLLMError as exc:  # refused before queueing: this is its one final reply
                code = protocol.error_code(exc)
                self.stats[code] += 1
                self._observe(address, protocol.Event("error", message.id, code=code), arrived)
                send(protocol.exception_reply(message.id, exc))
                return
            if given is not None:  # a key names its holder better than the connection does
                who = f"key:{grant.name}"

        def sink(event: protocol.Event) -> None:
            if grant is not None and event.done:  # one final per submit: the slot frees exactly once
                grant.release(0 if event.replayed else usage_tokens(event.usage))
            if event.done:  # counted before it is sent: a client that then scrapes sees it
                self._observe(address, event, arrived)
            send(protocol.reply(event))

        try:
            self.scheduler.submit(message, sink, client=address.client, reply_key=address.key, identity=who)
        except EdgeLLMError as exc:
            if grant is not None:
                grant.release()
            code = protocol.error_code(exc)
            self._observe(address, protocol.Event("error", message.id, code=code), arrived)
            send(protocol.exception_reply(message.id, exc))
        except Exception as exc:  # a bug, not bad input: answer it rather than lose the connection
            if grant is not None:
                grant.release()
            log.exception("submitting request %s failed", message.id)
            self._observe(address, protocol.Event("error", message.id, code="internal"), arrived)
            send(protocol.error_reply(message.id, "internal", f"{type(exc).__name__} while queueing"))

    def refused(self, transport: str, code: str, arrived: float) -> None:
        """Count a request its transport refused before handing it here (HTTP's 401 for a bad
        `Authorization` header): metrics see every answered request, refusals included."""
        self.stats[code] += 1
        self._observe(transport, protocol.Event("error", "", code=code), arrived)

    def _observe(self, address: Address | str, event: protocol.Event, arrived: float) -> None:
        if self.observer is None:
            return
        transport = address if isinstance(address, str) else getattr(address, "transport", "other")
        try:
            self.observer(transport, event, time.monotonic() - arrived)
        except Exception:  # metrics must never cost a reply
            log.exception("the metrics observer failed")
