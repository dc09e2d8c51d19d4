"""The wire protocol: every field validated, every kind of bad input a bad_request naming it."""

from __future__ import annotations

import json

import pytest

from edge_llm import protocol
from edge_llm.errors import BusyError, ContextLengthError, EdgeLLMError
from edge_llm.protocol import Cancel, Event, ProtocolError, Request, parse_message


def msg(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_full_request_parses() -> None:
    r = parse_message(
        msg(
            id="r1",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            max_tokens=12,
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            seed=3,
            stop=["\n\n", "END"],
            stream=True,
            session="chat-1",
            deadline_ms=5000,
            reply_to="replies/me",
            repetition_penalty=1.1,
            ignore_eos=True,
        )
    )
    assert isinstance(r, Request)
    assert r.id == "r1" and r.messages is not None and r.messages[1]["content"] == "hi"
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed) == (12, 0.7, 0.9, 40, 3)
    assert r.stop == ("\n\n", "END") and r.stream and r.session == "chat-1"
    assert r.deadline_ms == 5000 and r.reply_to == "replies/me" and r.ignore_eos


def test_defaults_and_single_stop_string() -> None:
    r = parse_message(msg(id="x", prompt="once upon", stop="."))
    assert isinstance(r, Request)
    assert r.prompt == "once upon" and r.messages is None and r.stop == (".",)
    assert r.max_tokens is None and r.temperature == 0.0 and not r.stream and r.session is None


def test_to_dict_round_trips() -> None:
    r = Request(
        id="a", messages=({"role": "user", "content": "é🙂"},), max_tokens=3, stream=True, stop=("x",)
    )
    assert parse_message(protocol.encode(r.to_dict())) == r


def test_cancel_message() -> None:
    assert parse_message(b'{"cancel": "r9"}') == Cancel("r9")
    with pytest.raises(ProtocolError):
        parse_message(b'{"cancel": "r9", "x": 1}')
    with pytest.raises(ProtocolError):
        parse_message(b'{"cancel": 5}')


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"id": "a", "prompt": "x", "temperature": NaN}', "NaN"),
        (b'{"prompt": "x"}', "id is required"),
        (msg(id="", prompt="x"), "id is required"),
        (msg(id="a" * 129, prompt="x"), "id is required"),
        (msg(id=7, prompt="x"), "id is required"),
        (msg(id="a", prompt="x", bogus=1, other=2), "unknown field(s): bogus, other"),
        (msg(id="a"), "exactly one of messages or prompt"),
        (msg(id="a", prompt="x", messages=[{"role": "user", "content": "y"}]), "exactly one"),
        (msg(id="a", prompt=""), "prompt must be"),
        (msg(id="a", messages=[]), "non-empty list"),
        (msg(id="a", messages="hi"), "non-empty list"),
        (msg(id="a", messages=[{"role": "wizard", "content": "y"}]), "role must be one of"),
        (msg(id="a", messages=[{"role": "user", "content": 5}]), "content must be a string"),
        (msg(id="a", messages=[{"role": "user", "content": "y", "extra": 1}]), "messages[0]"),
        (msg(id="a", prompt="x", max_tokens="5"), "max_tokens must be an integer"),
        (msg(id="a", prompt="x", max_tokens=True), "max_tokens must be an integer"),
        (msg(id="a", prompt="x", max_tokens=0), "max_tokens must be ≥ 1"),
        (msg(id="a", prompt="x", temperature="hot"), "temperature must be a number"),
        (msg(id="a", prompt="x", top_k=1.5), "top_k must be an integer"),
        (msg(id="a", prompt="x", seed=-1), "seed must be ≥ 0"),
        (msg(id="a", prompt="x", stream="yes"), "stream must be true or false"),
        (msg(id="a", prompt="x", stop=[1]), "stop must be"),
        (msg(id="a", prompt="x", deadline_ms=0), "deadline_ms must be ≥ 1"),
        (msg(id="a", prompt="x", session=3), "session must be"),
        (msg(id="a", prompt="x", reply_to="a/+/b"), "wildcards"),
        (msg(id="a", prompt="x", session="s"), "session turn takes messages"),
    ],
)
def test_bad_input_is_a_bad_request(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(payload)
    assert info.value.code == "bad_request"
    assert needle in str(info.value)


def test_error_keeps_the_id_and_reply_to_when_readable() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(msg(id="keep-me", prompt="x", max_tokens="many", reply_to="r/t"))
    assert info.value.request_id == "keep-me" and info.value.reply_to == "r/t"


def test_oversize_payload() -> None:
    big = msg(id="a", prompt="x" * 2000)
    with pytest.raises(ProtocolError, match="limit is 1000"):
        parse_message(big, max_bytes=1000)
    assert isinstance(parse_message(big, max_bytes=len(big)), Request)


def test_reply_shapes_and_encoding() -> None:
    assert protocol.chunk_reply("a", 0, "hé") == {"id": "a", "seq": 0, "delta": "hé"}
    final = protocol.final_reply("a", "text", "stop", {"prompt_tokens": 3})
    assert final == {
        "id": "a",
        "done": True,
        "text": "text",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3},
    }
    err = protocol.error_reply(None, "busy", "full")
    assert err == {"id": None, "done": True, "error": {"code": "busy", "message": "full"}}
    assert protocol.error_reply("a", "made_up", "?")["error"]["code"] == "internal"
    assert protocol.encode({"d": "🙂"}) == '{"d":"🙂"}'.encode()


def test_error_codes_come_from_the_error_tree() -> None:
    assert protocol.error_code(BusyError("x")) == "busy"
    assert protocol.error_code(ContextLengthError("x")) == "too_long"
    assert protocol.error_code(EdgeLLMError("x")) == "internal"
    assert protocol.error_code(ValueError("x")) == "internal"


def test_scheduler_events_map_to_replies_and_back() -> None:
    final = Event("final", "a", text="t", finish_reason="length", usage={"x": 1}, session="s")
    assert protocol.reply(final) == protocol.final_reply("a", "t", "length", {"x": 1}, "s")
    assert protocol.event_from_reply(protocol.reply(final)) == final
    error = Event("error", "a", code="deadline", message="late")
    assert protocol.event_from_reply(protocol.reply(error)) == error
    assert protocol.reply(Event("chunk", "a", seq=2, delta="d")) == {"id": "a", "seq": 2, "delta": "d"}


def test_a_cancel_may_name_its_reply_topic() -> None:
    assert parse_message(b'{"cancel": "a"}') == Cancel("a")
    assert parse_message(b'{"cancel": "a", "reply_to": "me/replies"}') == Cancel("a", "me/replies")
    for bad in (b'{"cancel": "a", "reply_to": "me/#"}', b'{"cancel": "a", "prompt": "x"}'):
        with pytest.raises(ProtocolError, match="cancel message"):
            parse_message(bad)
