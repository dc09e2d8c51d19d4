"""OpenAI's chat/completions wire format <-> the edge-llm protocol. No HTTP here.

In: a decoded OpenAI request body (`/v1/chat/completions` or `/v1/completions`). Out: a protocol
request object (a dict), which the HTTP transport hands to `Dispatcher.handle` as bytes — so the
protocol's own parser validates every value (one validator for every transport); this module
only checks and strips what OpenAI has and the protocol does not (model, n, stream_options,
user, content parts; `response_format` goes through unless it is plain text). Replies go the
other way: protocol chunks and finals to OpenAI's `chat.completion(.chunk)` / `text_completion`
objects, protocol error codes to HTTP statuses with OpenAI's error body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Protocol fields an OpenAI body may carry unchanged. The last five are edge-llm extensions
# (the `openai` client sends them with `extra_body`).
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "seed",
    "stop",
    "top_k",
    "repetition_penalty",
    "ignore_eos",
    "deadline_ms",
    "session",
)
# Accepted when they ask for nothing this server would do differently (see _unsupported).
_NEUTRAL = (
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
)
_OPENAI_ONLY = ("model", "stream", "stream_options", "max_tokens", "response_format", "user")
CHAT_FIELDS = frozenset((*_PASSTHROUGH, *_NEUTRAL, *_OPENAI_ONLY, "messages", "max_completion_tokens"))
COMPLETION_FIELDS = frozenset((*_PASSTHROUGH, *_NEUTRAL, *_OPENAI_ONLY, "prompt"))

# Protocol error code -> (HTTP status, OpenAI error type, OpenAI-style code).
_ERRORS: dict[str, tuple[int, str, str]] = {
    "bad_request": (400, "invalid_request_error", "bad_request"),
    "too_long": (400, "invalid_request_error", "context_length_exceeded"),
    "unauthorized": (401, "authentication_error", "invalid_api_key"),
    "rate_limited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "busy": (503, "server_error", "busy"),
    "deadline": (504, "server_error", "deadline"),
    "cancelled": (499, "invalid_request_error", "cancelled"),  # the client went away; nobody reads it
    "internal": (500, "server_error", "internal"),
}


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str = "bad_request",
        param: str | None = None,
        type_: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """`Retry-After` in whole seconds (rounded up: a client that waits it will fit)."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def from_error_reply(reply: dict[str, Any]) -> ApiError:
    """The HTTP error for a protocol error final."""
    err = reply["error"]
    status, type_, code = _ERRORS.get(err.get("code", "internal"), _ERRORS["internal"])
    retry = err.get("retry_after_s")
    if retry is None and status == 503:
        retry = 1.0  # busy: the protocol's advice is to back off and retry with the same request
    return ApiError(status, str(err.get("message", "")), code, type_=type_, retry_after_s=retry)


@dataclass(frozen=True)
class Mapped:
    """A request in protocol form (without its id), and what the HTTP side must remember."""

    fields: dict[str, Any]
    stream: bool
    include_usage: bool
    user: str | None


def to_protocol(body: Any, chat: bool, model_id: str) -> Mapped:
    """Check the OpenAI-only parts of `body` and map it to protocol fields; ApiError on a fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server has {model_id!r}",
            "model_not_found",
            "model",
        )
    _unsupported(body)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    if set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options: only include_usage is supported", param="stream_options")
    include_usage = _typed(options, "include_usage", bool, False, "stream_options.include_usage")
    user = _typed(body, "user", str, None)
    fmt = _typed(body, "response_format", dict, {"type": "text"})
    fields: dict[str, Any] = {k: body[k] for k in _PASSTHROUGH if k in body}
    if fmt.get("type") != "text":  # json_object / json_schema: the protocol validates and enforces it
        fields["response_format"] = fmt
    max_tokens = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        if max_tokens is not None and max_tokens != body["max_completion_tokens"]:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
        max_tokens = body["max_completion_tokens"]
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens  # the protocol checks its type and range
    if stream:
        fields["stream"] = True
    if chat:
        fields["messages"] = _messages(body.get("messages"))
    else:
        fields["prompt"] = _prompt(body.get("prompt"))
    return Mapped(fields, stream, include_usage, user)


def _unsupported(body: dict[str, Any]) -> None:
    """Fields OpenAI has that this server can only honour at their neutral value."""
    neutral = {
        "n": 1,
        "best_of": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logprobs": (False, None),
        "top_logprobs": (0, None),
        "echo": False,
        "suffix": (None, ""),
    }
    for name, ok in neutral.items():
        if name not in body or body[name] is None:
            continue
        value = body[name]
        allowed = ok if isinstance(ok, tuple) else (ok,)
        if isinstance(value, bool) != any(isinstance(a, bool) for a in allowed) or value not in allowed:
            raise ApiError(400, f"{name}={value!r} is not supported by this server", param=name)


def _typed(data: dict[str, Any], name: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"{param or name} must be {kind.__name__}", param=param or name)
    return value


def _messages(value: Any) -> Any:
    """OpenAI messages to protocol messages: text content parts joined, `developer` as system.
    Anything else (tool calls, images) is left for the protocol's validator to refuse."""
    if not isinstance(value, list):
        return value
    out = []
    for m in value:
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = dict(m)
        if m.get("role") == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
        content = m.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, "only text content parts are supported", param="messages")
            m["content"] = "".join(texts)
        out.append(m)
    return out


def _prompt(value: Any) -> Any:
    if isinstance(value, list):  # OpenAI allows a batch of prompts; this server answers one
        if len(value) != 1 or not isinstance(value[0], str):
            raise ApiError(400, "prompt: one string (or a list of one string) is supported", param="prompt")
        return value[0]
    return value


# --- replies -----------------------------------------------------------------------------------


def usage(u: dict[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(u.get("cached_tokens", 0))},
    }


def completion_object(
    chat: bool, rid: str, model: str, created: int, final: dict[str, Any]
) -> dict[str, Any]:
    """The whole answer (stream false)."""
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": final["text"]}}
    else:
        choice = {"index": 0, "text": final["text"]}
    choice.update(finish_reason=final["finish_reason"], logprobs=None)
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(final.get("usage")),
    }


def chunk_object(
    chat: bool,
    rid: str,
    model: str,
    created: int,
    text: str | None = None,
    finish_reason: str | None = None,
    role: bool = False,
    usage_of: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a delta, the closing one with its finish_reason, or (usage_of given,
    `stream_options.include_usage`) the usage-only chunk with no choices."""
    out: dict[str, Any] = {
        "id": ("chatcmpl-" if chat else "cmpl-") + rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
    }
    if usage_of is not None:
        out["choices"] = []
        out["usage"] = usage(usage_of)
        return out
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice.update(finish_reason=finish_reason, logprobs=None)
    out["choices"] = [choice]
    return out
