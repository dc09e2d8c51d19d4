"""Hostile input to the parser: every message is a Request/Cancel or exactly one bad_request.

First the cases found by fuzzing the server (issue 11), then property-based tests (hypothesis,
derandomized and bounded so the suite stays deterministic and takes a few seconds).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_llm import protocol
from edge_llm.protocol import Cancel, ProtocolError, Request, parse_message
from edge_llm.sampling import SamplingParams, make_rng, sample

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))

BIG = "9" * 400  # ~1e400: no float holds it


def req(extra: str, rid: str = '"r"') -> bytes:
    return ('{"id":' + rid + ',"messages":[{"role":"user","content":"hi"}]' + extra + "}").encode()


# (payload, id the error must carry, words the message must contain)
HOSTILE: list[tuple[bytes, str | None, str]] = [
    (b"[" * 1000 + b"]" * 1000, None, "nested deeper than 32"),
    (b'{"id":"d","x":' + b"[" * 5000 + b"]" * 5000 + b"}", None, "nested deeper"),
    (b"{" * 3000, None, "nested deeper"),  # unbalanced and deep
    # An unterminated string full of escaped quotes: a string-literal regex took 78 s on this.
    (b"[" * 40 + b'"' + b'\\"' * 30000, None, "nested deeper"),
    (b'"' + b'\\"' * 30000 + b"[" * 40, None, "not JSON"),
    (req(',"temperature":' + BIG), "r", "temperature must be in [0, 100]"),
    (req(',"top_p":' + BIG), "r", "top_p must be in (0, 1]"),
    (req(',"repetition_penalty":-' + BIG), "r", "repetition_penalty must be in (0, 10]"),
    (req(',"deadline_ms":1' + "0" * 312), "r", "deadline_ms must be ≤ 2^53 - 1"),
    (req(',"max_tokens":' + "9" * 5000), "r", "max_tokens must be ≤"),  # int() refuses > 4300 digits
    (req(',"seed":9007199254740992'), "r", "seed must be ≤"),
    (req(',"temperature":NaN'), "r", "temperature must be a finite number"),
    (req(',"top_p":-Infinity'), "r", "top_p must be a finite number"),
    (req(',"temperature":1e400'), "r", "temperature must be a finite number"),
    (req(",NaN:1"), None, "not JSON"),
    (req("", rid='"\\ud800"'), None, "id contains a lone UTF-16 surrogate"),
    (req(',"\\ud800":1'), "r", "a field name contains a lone UTF-16 surrogate"),
    (req(',"\\udfff\\ud800x":{"\\ud800":1}'), "r", "lone UTF-16 surrogate"),
    (b'{"id":"r","prompt":"a\\ud800b"}', "r", "prompt contains a lone"),
    (b'{"id":"r","messages":[{"role":"user","content":"\\udc00"}]}', "r", "messages contains a lone"),
    (req(',"session":"s\\ud83d"'), "r", "session contains a lone"),
    (req(',"stop":["\\ud800"]'), "r", "stop contains a lone"),
    (b'{"cancel":"\\ud800"}', None, "lone UTF-16 surrogate"),
    (b'{"id":"r","messages":[{"role":[],"content":"x"}]}', "r", "role must be one of"),
    (b'{"id":"r","messages":[{"role":{"a":1},"content":"x"}]}', "r", "role must be one of"),
]


@pytest.mark.parametrize(("payload", "rid", "needle"), HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_one_bad_request(payload: bytes, rid: str | None, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(payload, max_bytes=1 << 20)
    exc = info.value
    assert exc.code == "bad_request" and exc.request_id == rid and needle in str(exc), str(exc)
    # The reply must be sendable: its id and message never carry what made the message bad.
    reply = json.loads(protocol.encode(protocol.error_reply(exc.request_id, "bad_request", str(exc))))
    assert reply["error"]["code"] == "bad_request" and reply["id"] == rid


def test_valid_surrogate_pair_and_boundaries_still_parse() -> None:
    r = parse_message(b'{"id":"r","prompt":"\\ud83d\\ude00","deadline_ms":9007199254740991,"seed":0}')
    assert isinstance(r, Request) and r.prompt == "\U0001f600" and r.deadline_ms == 2**53 - 1
    deep_ok = b'{"id":"r","prompt":"[[[[' + b"[" * 100 + b'"}'  # brackets inside a string
    assert isinstance(parse_message(deep_ok), Request)
    r = parse_message(req(',"temperature":1e-300,"top_p":5e-324,"repetition_penalty":10'))
    assert isinstance(r, Request) and r.temperature == 1e-300 and r.top_p == 5e-324


def check(payload: bytes) -> Request | Cancel | ProtocolError:
    """The property: parse_message returns a message or raises ProtocolError, nothing else; an
    accepted request is one the sampler accepts; an error reply always encodes."""
    try:
        message = parse_message(payload)
    except ProtocolError as exc:
        assert exc.code == "bad_request"
        protocol.encode(protocol.error_reply(exc.request_id, "bad_request", str(exc)))
        return exc
    if isinstance(message, Request):
        SamplingParams(
            temperature=message.temperature,
            top_p=message.top_p,
            top_k=message.top_k,
            repetition_penalty=message.repetition_penalty,
            seed=message.seed,
            stop=message.stop,
        )
        protocol.encode(message.to_dict())
    return message


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes(payload: bytes) -> None:
    check(payload)


texts = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=20)
numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-3, max_value=2**54),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e-30),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=20,
)
FIELDS = [*sorted(protocol._FIELDS), "cancel", "role", "content"]


@FUZZ
@given(values)
def test_any_json_value(value: Any) -> None:
    # ensure_ascii writes lone surrogates as \\udXXX escapes, the way a hostile client would.
    check(json.dumps(value, ensure_ascii=True, allow_nan=True).encode())


@FUZZ
@given(
    st.dictionaries(st.sampled_from(FIELDS) | texts, values, max_size=6),
    st.sampled_from(["prompt", "messages", "session"]),
)
def test_requests_with_hostile_fields(fields: dict[str, Any], shape: str) -> None:
    # Start from a valid request so the fuzzed fields reach the validation behind the id check.
    base: dict[str, Any] = {"id": "r", "messages": [{"role": "user", "content": "hi"}]}
    if shape == "prompt":
        base = {"id": "r", "prompt": "hi"}
    elif shape == "session":
        base["session"] = "s"
    got = check(json.dumps({**base, **fields}, ensure_ascii=True, allow_nan=True).encode())
    if isinstance(got, ProtocolError) and "id" not in fields:
        assert got.request_id == "r"  # the id was readable, so the error carries it


@FUZZ
@given(st.integers(min_value=0, max_value=60), st.sampled_from([b"[", b"{", b'{"a":']))
def test_depth_limit_is_exact(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    inner = b"1" if opener != b"{" else b""
    got = check(opener * depth + inner + closer * depth)
    if depth > protocol.MAX_DEPTH:
        assert isinstance(got, ProtocolError) and "nested deeper" in str(got)


# --- sampling over the documented range ---------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-31])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    logits = np.random.default_rng(1).standard_normal(512).astype(np.float32) * 4
    params = SamplingParams(temperature=temperature, seed=0)
    rng = make_rng(params)
    assert params.greedy
    assert all(sample(logits, params, rng) == int(np.argmax(logits)) for _ in range(5))


@FUZZ
@given(
    st.floats(min_value=0.0, max_value=100.0),
    st.floats(min_value=5e-324, max_value=1.0),
    st.floats(min_value=5e-324, max_value=10.0),
    st.integers(min_value=0, max_value=600),
    st.floats(min_value=1e-3, max_value=1e4),
)
def test_sampling_never_fails_over_the_documented_range(
    temperature: float, top_p: float, penalty: float, top_k: int, scale: float
) -> None:
    logits = np.random.default_rng(2).standard_normal(300).astype(np.float32) * np.float32(scale)
    params = SamplingParams(
        temperature=temperature, top_p=top_p, repetition_penalty=penalty, top_k=top_k, seed=1
    )
    with np.errstate(invalid="raise"):  # a NaN made on the way is a failure, not just a bad pick
        token = sample(logits, params, make_rng(params), seen=np.arange(0, 300, 7))
    assert 0 <= token < 300
