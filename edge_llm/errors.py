"""One error tree for the whole runtime.

Every error the runtime raises on purpose derives from `EdgeLLMError` and carries a short,
stable `code` so transports can turn it into a protocol error reply without guessing.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every deliberate edge-llm error."""

    code = "internal"


class ConfigError(EdgeLLMError):
    """A TOML config or option is malformed, has unknown keys, or a value of the wrong type."""

    code = "bad_config"


class SwapSupersededError(ConfigError):
    """An engine swap still waiting for running requests was replaced by a newer swap (a SIGHUP
    reload meeting an OTA switch): the newer engine is the one that will serve."""


class BundleError(EdgeLLMError):
    """A bundle folder is missing a file, fails its checksum, or disagrees with its graph."""

    code = "bad_bundle"


class ProviderError(EdgeLLMError):
    """No requested execution provider could be configured (not even the CPU fallback)."""

    code = "provider"


class RequestError(EdgeLLMError):
    """A generation request is invalid (bad field, wrong type, out-of-range value)."""

    code = "bad_request"


class ProtocolError(RequestError):
    """A message that is not a valid request; `request_id`/`reply_to` are set when readable, so
    the transport can still address its `bad_request` reply."""

    def __init__(self, message: str, request_id: str | None = None, reply_to: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


class ContextLengthError(RequestError):
    """Prompt plus requested tokens exceed the model's context window."""

    code = "too_long"


class ConstraintError(EdgeLLMError):
    """Constrained decoding (response_format) failed mid-generation, e.g. a grammar parser limit:
    that request ends with `internal`, the others in its batch go on."""

    code = "internal"


class BusyError(EdgeLLMError):
    """The request queue is full; retry later."""

    code = "busy"


class UnauthorizedError(EdgeLLMError):
    """No API key, an unknown or revoked one, or a sender the keys file does not name."""

    code = "unauthorized"


class RateLimitedError(EdgeLLMError):
    """The sender's identity is over one of its limits; `retry_after_s` says when it will fit."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CancelledError(EdgeLLMError):
    """The request was cancelled by its client."""

    code = "cancelled"


class DeadlineError(EdgeLLMError):
    """The request's deadline passed before it finished."""

    code = "deadline"


class TransportError(EdgeLLMError):
    """A transport (MQTT broker, socket) failed or refused the connection."""

    code = "transport"


class RequestTimeout(TransportError):
    """Client side: no final reply within the client's timeout."""

    code = "timeout"


class ServerError(EdgeLLMError):
    """Client side: the server failed the request (`internal`) or answered with a code this client
    does not know (kept in `code`)."""

    code = "internal"


class ExportError(EdgeLLMError):
    """The export pipeline could not produce a bundle (bad source, bad recipe, failed stage)."""

    code = "export"


class PackError(EdgeLLMError):
    """`edge-llm pack` cannot build a board package (unsupported target, no wheels, bad input)."""

    code = "pack"


class UpdateError(EdgeLLMError):
    """A bundle update was refused (signature, damaged files, failed self-test); the active
    bundle is unchanged."""

    code = "update"


# The class a client raises for each error code of a reply (docs/protocol.md, "Error codes").
_REPLY_ERRORS: dict[str, type[EdgeLLMError]] = {
    "bad_request": RequestError,
    "too_long": ContextLengthError,
    "busy": BusyError,
    "cancelled": CancelledError,
    "deadline": DeadlineError,
    "unauthorized": UnauthorizedError,
}


def error_from_reply(error: dict[str, object]) -> EdgeLLMError:
    """The exception for a reply's `error` object: its code's class, else `ServerError`."""
    code = str(error.get("code", "internal"))
    if code == "rate_limited":  # carries when to retry
        retry = error.get("retry_after_s")
        return RateLimitedError(str(error.get("message", "")), float(retry) if retry else 1.0)  # type: ignore[arg-type]
    exc = _REPLY_ERRORS.get(code, ServerError)(str(error.get("message", "")))
    if type(exc) is ServerError and code != "internal":
        exc.code = code  # an unknown code stays visible to the caller
    return exc
