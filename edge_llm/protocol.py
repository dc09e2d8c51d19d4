"""The wire protocol shared by every transport (MQTT, Unix socket, TCP): JSON in, JSON out.

In: one message as bytes (an MQTT payload or one line of the socket stream). Out: a validated
`Request` or `Cancel`, or a `ProtocolError` that still knows the request id when it could be
read, so the transport can send an error reply. Replies are built here too, so both transports
put exactly the same bytes on the wire. See docs/protocol.md for the reference.

This module imports nothing heavy (no engine, no paho): the client SDK uses it as well.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from edge_llm.chat import ROLES  # light: the client SDK imports this module
from edge_llm.errors import EdgeLLMError, RequestError

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
DEFAULT_MAX_PAYLOAD = 64 * 1024

# The fixed set of error codes a reply may carry. Anything else the runtime raises is reported
# as "internal" so clients can switch on a closed set.
ERROR_CODES = (
    "bad_request",
    "too_long",
    "busy",
    "cancelled",
    "deadline",
    "internal",
    "unauthorized",
    "rate_limited",
)
# Codes a client may retry with the same request id (the server will not have stored a final).
# rate_limited: after the reply's `retry_after_s`; unauthorized: never (fix the key).
RETRYABLE_CODES = frozenset({"busy", "rate_limited"})


_FIELDS = frozenset(
    {
        "id",
        "messages",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "session",
        "deadline_ms",
        "reply_to",
        "repetition_penalty",
        "ignore_eos",
        "key",
    }
)


class ProtocolError(RequestError):
    """A message that is not a valid request; `request_id`/`reply_to` are set when readable."""

    def __init__(self, message: str, request_id: str | None = None, reply_to: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


@dataclass(frozen=True)
class Request:
    id: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    max_tokens: int | None = None  # None: the server's default
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    session: str | None = None
    deadline_ms: int | None = None
    reply_to: str | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    # An API key (with `serve --keys-file`) where the transport carries none of its own (MQTT,
    # socket); kept out of repr so it never reaches a log line.
    key: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this request, without fields left at their defaults."""
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        if self.prompt is not None:
            out["prompt"] = self.prompt
        defaults = Request(id=self.id)
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stream",
            "session",
            "deadline_ms",
            "reply_to",
            "repetition_penalty",
            "ignore_eos",
            "key",
        ):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                out[name] = value
        if self.stop:
            out["stop"] = list(self.stop)
        return out


@dataclass(frozen=True)
class Cancel:
    """`{"cancel": "<id>"}`: stop request <id> (queued or running)."""

    id: str


def parse_message(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Request | Cancel:
    """Decode and validate one message; raise ProtocolError (code bad_request) on any fault."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"message is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"message is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    if "cancel" in data:
        if set(data) != {"cancel"} or not _is_id(data["cancel"]):
            raise ProtocolError('a cancel message is {"cancel": "<request id>"} and nothing else')
        return Cancel(data["cancel"])
    return parse_request(data)


def parse_request(data: dict[str, Any]) -> Request:
    """Validate a decoded request object (see docs/protocol.md for the fields)."""
    rid = data.get("id")
    reply_to = data.get("reply_to") if isinstance(data.get("reply_to"), str) else None
    if not _is_id(rid):
        raise ProtocolError(f"id is required: a string of 1..{MAX_ID_CHARS} characters", None, reply_to)

    def fail(message: str) -> ProtocolError:
        return ProtocolError(message, rid, reply_to)

    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise fail(f"unknown field(s): {', '.join(unknown)}")
    if ("messages" in data) == ("prompt" in data):
        raise fail("give exactly one of messages or prompt")
    messages = None
    if "messages" in data:
        messages = _messages(data["messages"], fail)
    prompt = data.get("prompt")
    if prompt is not None and not (isinstance(prompt, str) and prompt):
        raise fail("prompt must be a non-empty string")
    stop = data.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 8 or not all(isinstance(s, str) and s for s in stop):
        raise fail("stop must be a non-empty string or a list of at most 8 of them")
    for name in ("session", "reply_to", "key"):
        value = data.get(name)
        if value is not None and not _is_id(value):
            raise fail(f"{name} must be a string of 1..{MAX_ID_CHARS} characters")
    if reply_to is not None and any(c in reply_to for c in "+#\0"):
        raise fail("reply_to must be a topic name without wildcards")
    request = Request(
        id=str(rid),
        messages=messages,
        prompt=prompt,
        max_tokens=_int(data, "max_tokens", 1, None, fail),
        temperature=_number(data, "temperature", 0.0, fail),
        top_p=_number(data, "top_p", 1.0, fail),
        top_k=_int(data, "top_k", 0, 0, fail) or 0,
        seed=_int(data, "seed", 0, None, fail),
        stop=tuple(stop),
        stream=_bool(data, "stream", fail),
        session=data.get("session"),
        deadline_ms=_int(data, "deadline_ms", 1, None, fail),
        reply_to=reply_to,
        repetition_penalty=_number(data, "repetition_penalty", 1.0, fail),
        ignore_eos=_bool(data, "ignore_eos", fail),
        key=data.get("key"),
    )
    if request.session is not None and request.prompt is not None:
        raise fail("a session turn takes messages (the new ones), not a raw prompt")
    return request


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _messages(value: Any, fail: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise fail("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m:
            raise fail(f"messages[{i}] must be an object with role and content")
        if m["role"] not in ROLES:
            raise fail(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise fail(f"messages[{i}].content must be a string")
        if "name" in m and not isinstance(m["name"], str):
            raise fail(f"messages[{i}].name must be a string")
        out.append(dict(m))
    return tuple(out)


def _int(data: dict[str, Any], name: str, low: int, default: int | None, fail: Any) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    # bool is an int in Python, but `true` for max_tokens is a client bug worth reporting.
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"{name} must be an integer")
    if value < low:
        raise fail(f"{name} must be ≥ {low}")
    return value


def _number(data: dict[str, Any], name: str, default: float, fail: Any) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(f"{name} must be a number")
    return float(value)


def _bool(data: dict[str, Any], name: str, fail: Any) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise fail(f"{name} must be true or false")
    return value


# --- replies -----------------------------------------------------------------------------------


def chunk_reply(request_id: str, seq: int, delta: str) -> dict[str, Any]:
    return {"id": request_id, "seq": seq, "delta": delta}


def final_reply(
    request_id: str, text: str, finish_reason: str, usage: dict[str, Any], session: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": request_id,
        "done": True,
        "text": text,
        "finish_reason": finish_reason,
        "usage": usage,
    }
    if session is not None:
        out["session"] = session
    return out


def error_reply(
    request_id: str | None, code: str, message: str, retry_after_s: float | None = None
) -> dict[str, Any]:
    if code not in ERROR_CODES:
        code = "internal"
    error: dict[str, Any] = {"code": code, "message": message}
    if retry_after_s is not None:  # rate_limited: when the same request will fit
        error["retry_after_s"] = round(retry_after_s, 3)
    return {"id": request_id, "done": True, "error": error}


def exception_reply(request_id: str | None, exc: BaseException) -> dict[str, Any]:
    """The error reply for an exception (its code, message and, if it has one, retry-after)."""
    return error_reply(request_id, error_code(exc), str(exc), getattr(exc, "retry_after_s", None))


def error_code(exc: BaseException) -> str:
    """The protocol code for an exception: its own code when in the fixed set, else internal."""
    code = getattr(exc, "code", "internal") if isinstance(exc, EdgeLLMError) else "internal"
    return code if code in ERROR_CODES else "internal"


def encode(reply: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (no trailing newline; the socket transport adds its own)."""
    return json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def is_final(reply: dict[str, Any]) -> bool:
    return reply.get("done") is True
