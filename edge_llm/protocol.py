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
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_llm.chat import ROLES  # light: the client SDK imports this module
from edge_llm.errors import EdgeLLMError, ProtocolError  # ProtocolError: importable from here too
from edge_llm.structured import ResponseFormat, parse_response_format  # light: llguidance is lazy
from edge_llm.topics import topic_problem

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
DEFAULT_MAX_PAYLOAD = 64 * 1024
# Deepest nesting of arrays/objects a message may have. A request needs 3 (object > messages >
# message); the limit exists because json.loads recurses and would hit RecursionError (and
# take the connection with it) near the interpreter's recursion limit.
MAX_DEPTH = 32
# Integers above this are refused: the largest that every JSON implementation (doubles) holds
# exactly, and small enough that `deadline_ms / 1000` or a seed never overflows downstream.
MAX_INT = 2**53 - 1
# The documented range of each number field: (low, high, low itself allowed). SamplingParams
# checks the same table, so a request the parser accepts is one the sampler takes.
NUMBER_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 100.0, True),
    "top_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, 10.0, False),
}


def in_range(name: str, value: float) -> bool:
    """Whether `value` is inside NUMBER_RANGES[name] (False for NaN)."""
    low, high, low_ok = NUMBER_RANGES[name]
    return (low <= value if low_ok else low < value) and value <= high


def range_text(name: str) -> str:
    low, high, low_ok = NUMBER_RANGES[name]
    return f"{name} must be in {'[' if low_ok else '('}{low:g}, {high:g}]"


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
        "response_format",
    }
)


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
    # JSON output enforced while decoding (edge_llm/structured.py); None: plain text.
    response_format: ResponseFormat | None = None

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
        if self.response_format is not None:
            out["response_format"] = self.response_format.to_dict()
        return out


@dataclass(frozen=True)
class Cancel:
    """`{"cancel": "<id>"}`: stop request <id> (queued or running). Over MQTT on the plain
    cancel topic it names the request's reply topic too (`reply_to`): that is whose it is."""

    id: str
    reply_to: str | None = None
    # The API key the request was made with, when it was: such a request belongs to the key.
    key: str | None = field(default=None, repr=False)


def parse_message(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Request | Cancel:
    """Decode and validate one message; raise ProtocolError (code bad_request) on any fault.

    Every input ends in one of those two outcomes: a fault this module did not foresee is still
    reported as a ProtocolError (id unknown), because a transport must answer each message once.
    """
    try:
        return _parse(payload, max_bytes)
    except ProtocolError:
        raise
    except Exception as exc:  # the promise above: never another exception type
        raise ProtocolError(f"message could not be parsed ({type(exc).__name__})") from None


def _parse(payload: bytes, max_bytes: int) -> Request | Cancel:
    if len(payload) > max_bytes:
        raise ProtocolError(f"message is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"message is not valid UTF-8 (byte {exc.start})") from None
    _check_depth(text)
    try:
        # NaN/Infinity literals (not JSON, but Python's json reads them) become float nan/inf
        # and huge integers a stand-in, so the field they sit in is refused with the id known.
        data = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    _check_strings(data)
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    if "cancel" in data:
        reply_to, key = data.get("reply_to"), data.get("key")
        if (
            set(data) - {"cancel", "reply_to", "key"}
            or not _is_id(data["cancel"])
            or (reply_to is not None and (not _is_id(reply_to) or topic_problem(reply_to, "reply_to")))
            or (key is not None and not _is_id(key))
        ):
            rid = data.get("id")
            raise ProtocolError(
                'a cancel message is {"cancel": "<request id>"} (MQTT: and "reply_to"; with API keys: '
                'and "key") and nothing else',
                rid if _is_id(rid) else None,
                reply_to if isinstance(reply_to, str) else None,
            )
        return Cancel(data["cancel"], reply_to, key)
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
    problem = topic_problem(reply_to, "reply_to") if reply_to is not None else None
    if problem is not None:
        raise fail(problem)  # the transport will not reply to that address either (log and drop)
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
        response_format=parse_response_format(data.get("response_format", {"type": "text"}), fail),
    )
    if request.response_format is not None and request.ignore_eos:
        raise fail("ignore_eos cannot be combined with a JSON response_format: the grammar ends the answer")
    if request.session is not None and request.prompt is not None:
        raise fail("a session turn takes messages (the new ones), not a raw prompt")
    return request


def _parse_int(digits: str) -> int:
    """An integer literal; one longer than any field allows becomes ±10**40 (still out of every
    field's range) instead of costing a quadratic conversion or int()'s 4300-digit ValueError."""
    if len(digits) <= 40:
        return int(digits)
    return -(10**40) if digits.startswith("-") else 10**40


# The characters that matter for nesting: brackets, and quotes/backslashes to skip strings.
_SPECIAL = re.compile(r'[\[\]{}"\\]')
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH without recursing (json.loads would).

    One pass over the special characters only, so linear even on hostile input (a regex for
    whole string literals backtracks quadratically on an unterminated one full of escapes)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # cannot be deeper: the common case costs two counts
    depth, in_string, escaped = 0, False, -1
    for match in _SPECIAL.finditer(text):
        at, ch = match.start(), match.group()
        if at == escaped:
            continue  # the character after a backslash inside a string
        if in_string:
            if ch == "\\":
                escaped = at + 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ProtocolError(f"message is nested deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _check_strings(data: Any) -> None:
    """Refuse lone UTF-16 surrogates (a "\\ud800" escape) in any string or field name.

    json.loads accepts them, but they are not Unicode text: the tokenizer, SQLite and the reply
    encoder would all fail on them later, far from the message that brought them in.
    """
    stack = [(data, "")]
    while stack:  # iterative (depth is already bounded, but this needs no recursion at all)
        value, where = stack.pop()
        if isinstance(value, str):
            bad = _SURROGATE.search(value) is not None
        elif isinstance(value, dict):
            bad = any(_SURROGATE.search(k) for k in value)
            stack.extend((v, where or (k if k in _FIELDS else "a field")) for k, v in value.items())
        elif isinstance(value, list):
            bad = False
            stack.extend((v, where) for v in value)
        else:
            continue
        if bad:
            request_id = reply_to = None
            if isinstance(data, dict):
                request_id, reply_to = (_clean_str(data.get(k)) for k in ("id", "reply_to"))
                request_id = request_id if _is_id(request_id) else None
            raise ProtocolError(
                f"{where or 'a field name'} contains a lone UTF-16 surrogate (\\ud800-\\udfff),"
                " which is not Unicode text",
                request_id,
                reply_to,
            )


def _clean_str(value: Any) -> str | None:
    """`value` if it is a string free of surrogates (safe to echo in a reply), else None."""
    return value if isinstance(value, str) and not _SURROGATE.search(value) else None


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
    if value > MAX_INT:
        raise fail(f"{name} must be ≤ 2^53 - 1 ({MAX_INT})")
    return value


def _number(data: dict[str, Any], name: str, default: float, fail: Any) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"{name} must be a number")
    try:
        number = float(value)  # an int beyond ~1.8e308 has no float (parse_request is public)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):  # NaN, Infinity, 1e400
        raise fail(f"{name} must be a finite number, not {json.dumps(number)}")  # NaN, Infinity
    if not in_range(name, number):
        raise fail(range_text(name))
    return number


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


@dataclass(frozen=True)
class Event:
    """One reply as a value: what the scheduler emits and the final store keeps. Transports turn
    it into wire JSON with `reply(event)`; `event_from_reply` reads that JSON back (stored
    finals are kept in their wire form, so a database outlives changes to this class)."""

    kind: Literal["chunk", "final", "error"]
    id: str
    seq: int = 0
    delta: str = ""
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, Any] | None = None
    session: str | None = None
    code: str = ""
    message: str = ""
    replayed: bool = False

    @property
    def done(self) -> bool:
        return self.kind != "chunk"


def reply(event: Event) -> dict[str, Any]:
    """The protocol reply object for a scheduler event."""
    if event.kind == "chunk":
        return chunk_reply(event.id, event.seq, event.delta)
    if event.kind == "final":
        return final_reply(event.id, event.text, event.finish_reason, event.usage or {}, event.session)
    return error_reply(event.id, event.code, event.message)


def event_from_reply(data: dict[str, Any], replayed: bool = False) -> Event:
    """The final or error event a stored reply object describes."""
    if "error" in data:
        err = data["error"]
        return Event("error", data["id"], code=err["code"], message=err["message"], replayed=replayed)
    return Event(
        "final",
        data["id"],
        text=data["text"],
        finish_reason=data["finish_reason"],
        usage=data.get("usage"),
        session=data.get("session"),
        replayed=replayed,
    )
