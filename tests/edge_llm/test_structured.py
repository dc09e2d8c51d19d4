"""Structured output (response_format): parsing, and JSON enforced while decoding on the tiny
random model — the best adversary there is: left alone it never writes JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_llm.board import RunnerOptions
from edge_llm.engine import Engine, Slot
from edge_llm.errors import ConstraintError, ProtocolError, RequestError
from edge_llm.protocol import Request, parse_message
from edge_llm.sampling import SamplingParams
from edge_llm.scheduler import Scheduler
from edge_llm.structured import ResponseFormat, parse_response_format

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_scheduler import Collector  # the scheduler tests' recording sink

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# Bounded on purpose (maxLength, enum, integer range): every answer the grammar allows ends
# within max_tokens, so "schema-valid every time" is a claim a test can make.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
SCHEMA_FMT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MESSAGES = [{"role": "user", "content": "Extract name and age from: Alice is 34."}]


@pytest.fixture(scope="module")
def engine(tiny_fused_all: Path) -> Engine:
    return Engine.load(tiny_fused_all)


def _ids(engine: Engine, text: str = MESSAGES[0]["content"]) -> list[int]:
    return engine.encode_request(messages=[{"role": "user", "content": text}])


# -- the request field ---------------------------------------------------------------------------


def test_response_format_parsing() -> None:
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ResponseFormat("json_object")
    fmt = parse_response_format(SCHEMA_FMT)
    assert fmt is not None and fmt.name == "person" and fmt.strict is True
    assert json.loads(fmt.schema) == PERSON and list(json.loads(fmt.schema)["properties"]) == list(
        PERSON["properties"]
    )  # the order of properties is the order the grammar writes them: kept
    assert fmt.to_dict() == SCHEMA_FMT
    bad = [
        {"type": "xml"},
        "json_object",
        {"type": "json_object", "schema": {}},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
        {"type": "json_schema", "json_schema": {"schema": {}, "name": "has space"}},
        {"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}},
    ]
    for value in bad:
        with pytest.raises(RequestError, match="response_format"):
            parse_response_format(value)


def test_protocol_carries_response_format_and_refuses_bad_ones() -> None:
    req = parse_message(json.dumps({"id": "a", "prompt": "p", "response_format": SCHEMA_FMT}).encode())
    assert isinstance(req, Request) and req.response_format == parse_response_format(SCHEMA_FMT)
    again = parse_message(json.dumps(req.to_dict()).encode())
    assert again == req  # to_dict round-trips (the client SDK sends what it was given)
    text = parse_message(b'{"id": "t", "prompt": "p", "response_format": {"type": "text"}}')
    assert isinstance(text, Request) and text.response_format is None
    for body, needle in [
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ]:
        with pytest.raises(ProtocolError, match=needle) as err:
            parse_message(json.dumps({"id": "b", "prompt": "p", **body}).encode())
        assert err.value.request_id == "b"  # the error reply can be addressed


# -- enforced while decoding ---------------------------------------------------------------------


def test_json_schema_is_always_schema_valid(engine: Engine) -> None:
    """Greedy and 24 sampled runs on several prompts: every answer ends and obeys the schema."""
    fmt = parse_response_format(SCHEMA_FMT)
    free = engine.complete(_ids(engine), SamplingParams(max_tokens=60))
    with pytest.raises(json.JSONDecodeError):  # unconstrained, this model writes no JSON at all
        json.loads(free.text)
    runs = [SamplingParams(max_tokens=200)] + [
        SamplingParams(max_tokens=200, temperature=t, top_p=p, seed=s, repetition_penalty=r)
        for s in range(6)
        for t, p, r in [(0.7, 1.0, 1.0), (1.5, 0.9, 1.0), (1.0, 1.0, 1.3), (2.0, 1.0, 0.8)]
    ]
    for i, params in enumerate(runs):
        final = engine.complete(_ids(engine, f"prompt {i}: who is it?"), params, response_format=fmt)
        assert final.finish_reason == "stop", final.text
        jsonschema.validate(json.loads(final.text), PERSON)


def test_json_object_is_parseable(engine: Engine) -> None:
    fmt = parse_response_format({"type": "json_object"})
    stopped = 0
    for seed in range(12):
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=seed)
        final = engine.complete(_ids(engine, f"json please {seed}"), params, response_format=fmt)
        if final.finish_reason == "stop":  # any object: a string may run past max_tokens ("length")
            stopped += 1
            assert isinstance(json.loads(final.text), dict)
        else:
            assert final.finish_reason == "length" and final.text.startswith("{")
    assert stopped >= 4  # the check above ran on real answers (5 of 12 here), not on none


def test_streamed_deltas_equal_the_json_text(engine: Engine) -> None:
    fmt = parse_response_format(SCHEMA_FMT)
    chunks = list(engine.generate(_ids(engine), SamplingParams(max_tokens=200), response_format=fmt))
    assert "".join(c.delta for c in chunks[:-1]) == chunks[-1].text
    jsonschema.validate(json.loads(chunks[-1].text), PERSON)


def test_speculation_is_off_for_constrained_rows(tiny_fused_all: Path) -> None:
    """Prompt-lookup drafts are verified against unmasked greedy choices, so constrained rows
    decode plainly: same answer as without speculation, no drafts."""
    spec = Engine.load(tiny_fused_all, RunnerOptions(prompt_lookup=4))
    plain = Engine.load(tiny_fused_all)
    fmt = parse_response_format(SCHEMA_FMT)
    ids = _ids(plain, "the the the the the the the the")
    a = spec.complete(ids, SamplingParams(max_tokens=200), response_format=fmt)
    b = plain.complete(ids, SamplingParams(max_tokens=200), response_format=fmt)
    assert a.text == b.text and a.usage is not None and a.usage.draft_tokens == 0
    unconstrained = spec.complete(ids, SamplingParams(max_tokens=40, ignore_eos=True))
    assert unconstrained.usage is not None and unconstrained.usage.draft_tokens > 0  # it was on


def test_a_schema_llguidance_cannot_enforce_is_bad_request(engine: Engine) -> None:
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}})
    with pytest.raises(RequestError, match="cannot be enforced"):
        engine.constraint(fmt)


def test_a_failing_constraint_ends_its_row_only(engine: Engine) -> None:
    class Broken:
        def allowed(self) -> np.ndarray:
            raise ConstraintError("constrained decoding failed: parser limit")

    cache = engine.runner.empty(2)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ok = engine.start(_ids(engine, "first"), params, Slot(cache=cache, row=0))
    seqs = [ok, engine.start(_ids(engine, "second"), params, Slot(cache=cache, row=1))]
    seqs[1].constraint = Broken()  # type: ignore[assignment]
    engine.step(seqs)
    assert seqs[1].finish == "error" and "parser limit" in str(seqs[1].error)
    while not ok.finished:
        engine.step(seqs)
    assert ok.final().finish_reason == "length" and len(ok.final().token_ids) == 8


# -- through the scheduler -----------------------------------------------------------------------


def test_two_constrained_and_one_free_request_batch_together(engine: Engine) -> None:
    """Each row has its own matcher and mask; the free row is untouched by the others' masks."""
    s = Scheduler(engine, max_queue=8, max_inflight_per_client=8, max_batch=4)
    obj = {"type": "json_object"}
    specs: list[dict[str, Any]] = [
        {"prompt": "first person", "response_format": SCHEMA_FMT, "max_tokens": 200},
        {"prompt": "free text", "max_tokens": 30, "ignore_eos": True},
        {"prompt": "second object", "response_format": obj, "max_tokens": 200},
    ]
    sinks = []
    for i, spec in enumerate(specs):
        sink = Collector()
        body = {"id": f"r{i}", **spec}
        s.submit(parse_message(json.dumps(body).encode()), sink)  # type: ignore[arg-type]
        sinks.append(sink)
    s.start()  # all queued before the worker starts: they run as one batch
    finals = [c.final(60) for c in sinks]
    s.close(grace_s=1)
    assert s.stats["peak_batch"] == 3 and all(f.kind == "final" for f in finals), finals
    jsonschema.validate(json.loads(finals[0].text), PERSON)
    assert finals[2].finish_reason != "stop" or isinstance(json.loads(finals[2].text), dict)
    # Alone, each gives the same answer: batching and the neighbours' masks changed nothing.
    for spec, final in zip(specs, finals, strict=True):
        fmt = parse_response_format(spec.get("response_format", {"type": "text"}))
        params = SamplingParams(max_tokens=spec["max_tokens"], ignore_eos=spec.get("ignore_eos", False))
        solo = engine.complete(engine.encode_request(prompt=spec["prompt"]), params, response_format=fmt)
        assert solo.text == final.text


def test_missing_extra_is_bad_request_naming_it(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if the extra were not installed
    s = Scheduler(engine)
    body = {"id": "x", "prompt": "p", "response_format": {"type": "json_object"}}
    req = parse_message(json.dumps(body).encode())
    with pytest.raises(RequestError, match=r"edge-llm\[structured\]"):
        s.submit(req, Collector())  # type: ignore[arg-type]
    assert s.in_flight == 0  # refused before queueing: nothing of it is kept
    fresh = Engine(engine.bundle)  # and an engine that never built its grammars refuses as well
    with pytest.raises(RequestError, match="structured"):
        fresh.constraint(parse_response_format({"type": "json_object"}))


# -- on the wire: socket and MQTT through the client SDK (HTTP, gRPC: test_http, test_grpc) ------


def test_socket_and_mqtt_clients_get_schema_valid_json(tiny_bundle: Path, tmp_path: Path) -> None:
    from edge_llm.board import BoardConfig, MqttConfig, SocketConfig
    from edge_llm.client import MqttClient, RetryPolicy, SocketClient
    from edge_llm.server import Server

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (importlib mode)
    from mosquitto import Broker

    retry = RetryPolicy(backoff_s=0.05, backoff_max_s=0.2, resend_after_s=5.0)
    with Broker(tmp_path / "broker") as broker:
        board = BoardConfig(
            socket=SocketConfig(path=str(tmp_path / "edge.sock")),
            mqtt=MqttConfig(host=broker.host, port=broker.port, device="s1"),
        )
        server = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
        server.start()
        try:
            with SocketClient(str(tmp_path / "edge.sock"), retry=retry) as c:
                r = c.generate(messages=MESSAGES, max_tokens=200, response_format=SCHEMA_FMT)
                jsonschema.validate(json.loads(r.text), PERSON)
                with pytest.raises(RequestError, match="cannot be enforced"):
                    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}
                    c.generate(messages=MESSAGES, response_format=bad)
            with MqttClient(broker.host, broker.port, device="s1", retry=retry, timeout=60) as m:
                stream = m.stream(messages=MESSAGES, max_tokens=200, response_format=SCHEMA_FMT)
                text = "".join(stream)
                assert stream.result is not None and text == stream.result.text
                jsonschema.validate(json.loads(text), PERSON)
        finally:
            server.stop()
