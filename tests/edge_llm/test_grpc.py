"""gRPC transport: a client generated from llm.proto against a real server on the tiny bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")

import grpc

from edge_llm.board import BoardConfig, GrpcConfig, MetricsConfig, ServerConfig
from edge_llm.engine import Engine
from edge_llm.proto import llm_pb2, llm_pb2_grpc
from edge_llm.server import Server
from edge_llm.transports.grpc import ERROR_CODE_KEY, STATUS, request_dict
from tests.prom_text import requests_total

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from mosquitto import free_port, make_certs

HELLO = [llm_pb2.Message(role="user", content="hello")]


@pytest.fixture
def served(tiny_bundle: Path, tmp_path: Path) -> Iterator[tuple[Server, Any]]:
    board = BoardConfig(
        grpc=GrpcConfig(listen=f"127.0.0.1:{free_port()}"),
        server=ServerConfig(max_payload=4096, max_queue=2, max_inflight_per_client=4),
    )
    s = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    s.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{s.grpc.port}")
    try:
        yield s, llm_pb2_grpc.LLMServiceStub(channel)
    finally:
        channel.close()
        s.stop()


def code_of(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(ERROR_CODE_KEY)


def wait_for(check: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_streams_deltas_then_one_final(served: tuple[Server, Any]) -> None:
    server, stub = served
    req = llm_pb2.ChatRequest(id="g1", messages=HELLO, max_tokens=6, ignore_eos=True, stream=True, seed=1)
    replies = list(stub.Chat(req, timeout=60))
    *chunks, last = replies
    assert [r.seq for r in chunks] == list(range(len(chunks))) and chunks
    assert all(r.id == "g1" and not r.HasField("final") for r in chunks)
    assert last.HasField("final") and last.content == ""
    assert last.final.text == "".join(r.content for r in chunks)
    assert last.final.finish_reason == "length"
    assert last.final.usage.completion_tokens == 6 and last.final.usage.prompt_tokens > 0
    # The same id again: the stored final, as on every transport.
    again = list(stub.Chat(llm_pb2.ChatRequest(id="g1", messages=HELLO, max_tokens=6, ignore_eos=True)))
    assert len(again) == 1 and again[0].final.text == last.final.text
    assert server.scheduler.stats["replayed"] == 1


def test_guide_fields_prompt_and_temperature(served: tuple[Server, Any]) -> None:
    _, stub = served
    req = llm_pb2.ChatRequest(prompt="The capital of France is", temperature=0.7, seed=3, max_tokens=4)
    (only,) = list(stub.Chat(req, timeout=60))
    assert only.final.usage.completion_tokens >= 1 and only.id  # an id was made up for it


def test_request_dict_goes_to_the_protocol_fields() -> None:
    req = llm_pb2.ChatRequest(
        id="x", messages=HELLO, temperature=0.7, top_p=0.9, top_k=5, seed=0, stop=["\n"], session="c",
        max_tokens=7, repetition_penalty=1.1, stream=True, response_format='{"type": "json_object"}',
    )  # fmt: skip
    assert request_dict(req, 1.5) == {
        "id": "x",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 7,
        "top_k": 5,
        "seed": 0,
        "session": "c",
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "stop": ["\n"],
        "stream": True,
        "response_format": {"type": "json_object"},
        "deadline_ms": 1500,
    }
    assert request_dict(llm_pb2.ChatRequest(id="y", prompt="p"), None) == {"id": "y", "prompt": "p"}


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"messages": HELLO, "prompt": "both"}, "INVALID_ARGUMENT", "bad_request"),
        ({}, "INVALID_ARGUMENT", "bad_request"),  # neither prompt nor messages
        ({"messages": HELLO, "top_p": 2.0}, "INVALID_ARGUMENT", "bad_request"),
        ({"messages": HELLO, "response_format": "{not json"}, "INVALID_ARGUMENT", "bad_request"),
        ({"messages": HELLO, "response_format": '{"type": "xml"}'}, "INVALID_ARGUMENT", "bad_request"),
        ({"messages": [llm_pb2.Message(role="robot", content="x")]}, "INVALID_ARGUMENT", "bad_request"),
        ({"prompt": "word " * 300, "max_tokens": 10}, "OUT_OF_RANGE", "too_long"),
    ],
)  # fmt: skip
def test_errors_map_to_status_codes(
    served: tuple[Server, Any], fields: dict[str, Any], status: str, code: str
) -> None:
    _, stub = served
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Chat(llm_pb2.ChatRequest(id="e1", **fields), timeout=60))
    assert info.value.code() == getattr(grpc.StatusCode, status)
    assert code_of(info.value) == code
    assert info.value.details()  # the protocol's message says what was wrong


def test_json_schema_response_format_is_enforced(served: tuple[Server, Any]) -> None:
    """response_format travels as JSON text and the answer obeys the schema (extra 'structured')."""
    pytest.importorskip("llguidance")
    _, stub = served
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"}},
        "required": ["city", "ok"],
        "additionalProperties": False,
    }
    fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    req = llm_pb2.ChatRequest(id="js", messages=HELLO, max_tokens=120, response_format=fmt)
    (only,) = list(stub.Chat(req, timeout=60))
    assert only.final.finish_reason == "stop"
    value = json.loads(only.final.text)
    assert set(value) == {"city", "ok"} and isinstance(value["ok"], bool) and len(value["city"]) <= 10


def test_status_table_covers_every_code() -> None:
    from edge_llm.protocol import ERROR_CODES

    assert set(ERROR_CODES) <= set(STATUS)
    assert STATUS["busy"] == grpc.StatusCode.UNAVAILABLE
    assert STATUS["rate_limited"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS["unauthorized"] == grpc.StatusCode.UNAUTHENTICATED


def slow_down(server: Server, monkeypatch: pytest.MonkeyPatch, step_s: float = 0.01) -> None:
    """Make every decode step take at least `step_s`: the tiny model decodes ~500-1000 tokens/s,
    too fast for a test to be sure a request is still running when its deadline or cancel comes."""
    step = server.engine.step

    def slow(seqs: Any) -> None:
        time.sleep(step_s)
        step(seqs)

    monkeypatch.setattr(server.engine, "step", slow)


def test_deadline_maps_to_deadline(served: tuple[Server, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A gRPC deadline becomes the request's deadline_ms: the scheduler ends it as `deadline`
    (not `cancelled`), and the client sees DEADLINE_EXCEEDED."""
    server, stub = served
    slow_down(server, monkeypatch)  # 230 tokens: ≥ 2.3 s, past the 1 s deadline
    req = llm_pb2.ChatRequest(id="d1", messages=HELLO, max_tokens=230, ignore_eos=True, stream=True)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Chat(req, timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: server.scheduler.in_flight == 0)
    assert server.scheduler.stats["deadline"] == 1 and server.scheduler.stats["cancelled"] == 0


def test_cancel_maps_to_cancel(served: tuple[Server, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    server, stub = served
    slow_down(server, monkeypatch)
    req = llm_pb2.ChatRequest(id="c1", messages=HELLO, max_tokens=230, ignore_eos=True, stream=True)
    call = stub.Chat(req)
    first = next(call)
    assert first.id == "c1" and first.content
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: server.scheduler.stats["cancelled"] == 1)
    assert server.scheduler.in_flight == 0 or server.scheduler.stats["cancelled"] == 1
    # A cancelled request is stored: the same id gets its `cancelled` error again.
    with pytest.raises(grpc.RpcError) as again:
        list(stub.Chat(req, timeout=30))
    assert again.value.code() == grpc.StatusCode.CANCELLED and code_of(again.value) == "cancelled"


def test_busy_maps_to_unavailable(served: tuple[Server, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the queue bound (max_queue 2, one running): `busy`, which gRPC calls UNAVAILABLE.
    Six calls start together; each takes ≥ 0.5 s of decoding, so at most three fit (one running,
    two queued) and the others are refused at once. Every call ends with one outcome."""
    server, stub = served
    slow_down(server, monkeypatch)
    long = {"messages": HELLO, "max_tokens": 50, "ignore_eos": True}
    calls = [stub.Chat(llm_pb2.ChatRequest(id=f"b{i}", **long)) for i in range(6)]
    outcomes = []
    for call in calls:
        try:
            replies = list(call)
            assert len(replies) == 1 and replies[0].HasField("final")
            outcomes.append("completed")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            outcomes.append(code_of(err))
    assert "busy" in outcomes and "completed" in outcomes
    assert set(outcomes) == {"busy", "completed"}
    assert server.scheduler.stats["busy"] == outcomes.count("busy")


def test_metrics_count_grpc(served: tuple[Server, Any]) -> None:
    server, stub = served
    list(stub.Chat(llm_pb2.ChatRequest(id="m1", messages=HELLO, max_tokens=2), timeout=60))
    body, _ = server.metrics.render()
    assert 'edge_llm_requests_total{outcome="completed",transport="grpc"} 1.0' in body.decode()


def test_nothing_else_needed_to_serve_grpc_only(served: tuple[Server, Any]) -> None:
    server, _ = served
    assert server.socket is None and server.mqtt is None and server.grpc is not None


def test_missing_extra_names_it() -> None:
    """Without grpcio the transport module says which extra to install (serve shows it)."""
    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "from edge_llm.errors import ConfigError\n"
        "try:\n    import edge_llm.transports.grpc\nexcept ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'edge-llm[grpc]'" in out.stdout, out.stderr


@pytest.mark.parametrize("listen", ["nope", "host:", "host:99999", ":x"])
def test_listen_addresses_are_checked(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        GrpcConfig(listen=listen)
    with pytest.raises(ValueError, match="HOST:PORT"):
        MetricsConfig(listen=listen)


def test_serve_flags_set_the_board() -> None:
    from edge_llm.cli import build_parser
    from edge_llm.commands.serve import board_with_overrides
    from edge_llm.errors import ConfigError

    argv = ["serve", "--bundle", "b", "--grpc", "127.0.0.1:0", "--metrics", ":9464"]
    argv += ["--metrics-interval", "5"]
    board = board_with_overrides(build_parser().parse_args(argv))
    assert board.grpc.listen == "127.0.0.1:0" and board.metrics.listen == ":9464"
    assert board.mqtt.metrics_interval_s == 5
    with pytest.raises(ConfigError, match="HOST:PORT"):
        board_with_overrides(build_parser().parse_args(["serve", "--bundle", "b", "--grpc", "50051"]))


def test_api_keys_on_grpc(tiny_bundle: Path, tmp_path: Path) -> None:
    """With a keys file a call carries its key as `authorization: Bearer` metadata: none or a
    wrong one ends UNAUTHENTICATED, a key over its rate ends RESOURCE_EXHAUSTED, a good one streams."""
    from edge_llm.board import KeysConfig
    from edge_llm.keys import Limits, add_key

    path = tmp_path / "keys.json"
    key, slow = add_key(path, "app", Limits()), add_key(path, "slow", Limits(requests_per_minute=1))
    board = BoardConfig(
        grpc=GrpcConfig(listen=f"127.0.0.1:{free_port()}"),
        keys=KeysConfig(file=str(path)),
        metrics=MetricsConfig(listen=f"127.0.0.1:{free_port()}"),
    )
    s = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    s.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{s.grpc.port}")
    stub = llm_pb2_grpc.LLMServiceStub(channel)

    def call(token: str | None) -> list[Any]:
        meta = [("authorization", f"Bearer {token}")] if token else None
        return list(stub.Chat(llm_pb2.ChatRequest(messages=HELLO, max_tokens=3), metadata=meta, timeout=60))

    try:
        for token in (None, "not-a-key"):
            with pytest.raises(grpc.RpcError) as err:
                call(token)
            assert (
                err.value.code() == grpc.StatusCode.UNAUTHENTICATED and code_of(err.value) == "unauthorized"
            )
        assert call(key)[-1].final.finish_reason in ("length", "stop")
        call(slow)
        with pytest.raises(grpc.RpcError) as err:
            call(slow)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and code_of(err.value) == "rate_limited"
        # Refusals are counted by outcome on /metrics, beside the answered calls.
        with urllib.request.urlopen(f"http://{board.metrics.listen}/metrics", timeout=30) as r:
            counts = requests_total(r.read().decode())
        assert counts[("grpc", "unauthorized")] == 2 and counts[("grpc", "rate_limited")] == 1
        assert counts[("grpc", "completed")] == 2
    finally:
        channel.close()
        s.stop()


def channel(target: str, ca: str = "", cert: str = "", key: str = "") -> grpc.Channel:
    """A client channel to `target`: TLS trusting `ca` when given (with `cert`, `key`: a client
    certificate), else plaintext."""
    if not ca:
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    return grpc.secure_channel(target, creds)


def test_tls_and_client_certificates(tiny_bundle: Path, tmp_path: Path) -> None:
    """[grpc.tls] cert/key serve TLS; with ca, only a client with a certificate that CA signed
    gets in. Certificates made here with openssl; `channel` is the client side."""
    from edge_llm.board import ServerTlsConfig, load_board
    from edge_llm.errors import ConfigError, TransportError

    certs = make_certs(tmp_path / "pki")
    req = llm_pb2.ChatRequest(messages=HELLO, max_tokens=3)
    for ca in ("", str(certs.ca)):
        tls = ServerTlsConfig(cert=str(certs.server_cert), key=str(certs.server_key), ca=ca)
        board = BoardConfig(grpc=GrpcConfig(listen=f"127.0.0.1:{free_port()}", tls=tls))
        s = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / f"state{bool(ca)}.sqlite")
        s.start()
        target = f"127.0.0.1:{s.grpc.port}"
        mutual = (str(certs.ca), str(certs.client_cert), str(certs.client_key))
        try:
            with channel(target, *mutual) as ch:  # a client certificate: always accepted
                assert list(llm_pb2_grpc.LLMServiceStub(ch).Chat(req, timeout=60))[-1].HasField("final")
            with channel(target, ca=str(certs.ca)) as ch:  # TLS, no client certificate
                stub = llm_pb2_grpc.LLMServiceStub(ch)
                if ca:
                    with pytest.raises(grpc.RpcError) as err:
                        list(stub.Chat(req, timeout=20))
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                else:
                    assert list(stub.Chat(req, timeout=60))[-1].final.finish_reason in ("length", "stop")
            with channel(target) as ch, pytest.raises(grpc.RpcError) as err:  # plaintext on a TLS port
                list(llm_pb2_grpc.LLMServiceStub(ch).Chat(req, timeout=20))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            s.stop()
    # A key that is not the certificate's: refused at start-up, naming the files.
    wrong = ServerTlsConfig(cert=str(certs.server_cert), key=str(certs.client_key))
    board = BoardConfig(grpc=GrpcConfig(listen=f"127.0.0.1:{free_port()}", tls=wrong))
    with pytest.raises(TransportError, match=r"grpc\.tls: .*server\.crt"):
        Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "bad.sqlite").start()
    profile = tmp_path / "b.toml"
    profile.write_text(f'[grpc]\nlisten = "127.0.0.1:0"\n[grpc.tls]\ncert = "{certs.server_cert}"\n')
    with pytest.raises(ConfigError, match=r"grpc\.tls: cert and key go together"):
        load_board(profile)


def test_tls_paths_with_a_tilde_are_read_from_home(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~/...` in [grpc.tls] names the same files for grpc and for the ssl check at start; a
    missing one is a TransportError naming it, not a FileNotFoundError."""
    from edge_llm.board import ServerTlsConfig
    from edge_llm.errors import TransportError

    certs = make_certs(tmp_path / "home" / "pki")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tls = ServerTlsConfig(cert="~/pki/" + certs.server_cert.name, key="~/pki/" + certs.server_key.name)
    board = BoardConfig(grpc=GrpcConfig(listen=f"127.0.0.1:{free_port()}", tls=tls))
    s = Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "state.sqlite")
    s.start()
    try:
        with channel(f"127.0.0.1:{s.grpc.port}", ca=str(certs.ca)) as ch:
            req = llm_pb2.ChatRequest(messages=HELLO, max_tokens=2)
            assert list(llm_pb2_grpc.LLMServiceStub(ch).Chat(req, timeout=60))[-1].HasField("final")
    finally:
        s.stop()
    missing = ServerTlsConfig(cert="~/pki/" + certs.server_cert.name, key="~/pki/none.key")
    board = BoardConfig(grpc=GrpcConfig(listen=f"127.0.0.1:{free_port()}", tls=missing))
    with pytest.raises(TransportError, match=r"grpc\.tls: cannot read key .*none\.key"):
        Server(Engine.load(tiny_bundle), board, state_path=tmp_path / "bad.sqlite").start()
