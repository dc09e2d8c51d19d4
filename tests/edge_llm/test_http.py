"""The OpenAI-compatible HTTP transport end to end: a real server on the tiny bundle, driven by the
official `openai` package (sync, async, streaming), raw HTTP, and curl against `edge-llm serve`."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from edge_llm.board import BoardConfig, HttpConfig, KeysConfig, ServerConfig  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.keys import Limits, add_key  # noqa: E402
from edge_llm.server import Server  # noqa: E402
from tests.prom_text import requests_total  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ROOT = Path(__file__).resolve().parents[2]


def start(bundle: Path, folder: Path, **board: Any) -> Server:
    cfg = BoardConfig(http=HttpConfig(host="127.0.0.1", port=0), **board)
    server = Server(Engine.load(bundle), cfg, state_path=folder / "state.sqlite")
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(tiny_bundle, tmp_path_factory.mktemp("http"), server=ServerConfig(max_payload=4096))
    yield s
    s.stop()


def client(server: Server, key: str = "unused", **kw: Any) -> Any:
    return openai.OpenAI(base_url=server.http.url + "/v1", api_key=key, **kw)


def raw(
    server: Server, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, Any, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=60)
    conn.request(method, path, body, {"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, json.loads(data) if data.startswith(b"{") else data


def test_openai_sync_chat_stream_and_completions(server: Server) -> None:
    c = client(server)
    models = c.models.list().data
    assert [m.id for m in models] == [server.engine.bundle.name] == [server.http.model_id]
    r = c.chat.completions.create(model=server.http.model_id, messages=QUESTION, max_tokens=12)
    answer = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    deltas, usage, finish = [], None, None
    stream = c.chat.completions.create(
        messages=QUESTION, model=server.http.model_id, max_completion_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        (choice,) = chunk.choices
        finish = choice.finish_reason or finish
        if choice.delta.content:
            deltas.append(choice.delta.content)
    assert "".join(deltas) == answer  # greedy: the stream and the whole answer agree
    assert finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

    done = c.completions.create(model=server.http.model_id, prompt="Once upon a time", max_tokens=5, seed=3)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 5
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=server.http.model_id, prompt="Once upon a time", max_tokens=5, stream=True
        )
    )
    assert streamed == done.choices[0].text


def test_openai_async_concurrent(server: Server) -> None:
    async def go() -> list[str]:
        c = openai.AsyncOpenAI(base_url=server.http.url + "/v1", api_key="unused")
        rs = await asyncio.gather(
            *[
                c.chat.completions.create(model=server.http.model_id, messages=QUESTION, max_tokens=8)
                for _ in range(3)
            ]
        )
        stream = await c.chat.completions.create(
            model=server.http.model_id, messages=QUESTION, max_tokens=8, stream=True
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        await c.close()
        return [r.choices[0].message.content for r in rs] + [text]

    texts = asyncio.run(go())
    assert len(set(texts)) == 1 and texts[0]


def test_errors_have_openai_bodies_and_statuses(server: Server) -> None:
    c = client(server, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(
            model=server.http.model_id, messages=QUESTION, response_format={"type": "xml"}
        )
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument"):
        c.chat.completions.create(model=server.http.model_id, messages=QUESTION, extra_body={"tools_x": 1})
    with pytest.raises(openai.BadRequestError) as err:  # the protocol's validator speaks
        c.chat.completions.create(model=server.http.model_id, messages=QUESTION, temperature=-1)
    assert "temperature" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=server.http.model_id, messages=QUESTION, max_tokens=10**6)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="not supported"):
        c.chat.completions.create(model=server.http.model_id, messages=QUESTION, n=2)

    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    status, _, body = raw(server, "POST", "/v1/chat/completions", big)
    assert status == 413 and body["error"]["code"] == "too_large"
    bomb = gzip.compress(json.dumps({"messages": [{"role": "user", "content": " " * 10**6}]}).encode())
    assert len(bomb) < 4096
    status, _, body = raw(server, "POST", "/v1/chat/completions", bomb, **{"Content-Encoding": "gzip"})
    assert status == 413
    status, _, body = raw(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405


def test_openai_response_format_json_schema(server: Server) -> None:
    """The official client's response_format reaches the decoder: the answer obeys the schema,
    streamed or not (extra 'structured')."""
    pytest.importorskip("llguidance")
    c = client(server, max_retries=0)
    schema = {
        "type": "object",
        "properties": {"device": {"type": "string", "maxLength": 12}, "action": {"enum": ["on", "off"]}},
        "required": ["device", "action"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "command", "schema": schema, "strict": True}}
    model = server.http.model_id
    r = c.chat.completions.create(model=model, messages=QUESTION, response_format=fmt, max_tokens=100)
    value = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop" and set(value) == {"device", "action"}
    assert value["action"] in ("on", "off") and len(value["device"]) <= 12
    stream = c.chat.completions.create(
        model=server.http.model_id, messages=QUESTION, response_format=fmt, max_tokens=100, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="cannot be enforced"):  # a schema llguidance refuses
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
        c.chat.completions.create(model=server.http.model_id, messages=QUESTION, response_format=bad)


def test_gzip_body_health_and_readiness(server: Server) -> None:
    body = gzip.compress(json.dumps({"messages": QUESTION, "max_tokens": 4}).encode())
    status, _, reply = raw(server, "POST", "/v1/chat/completions", body, **{"Content-Encoding": "gzip"})
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"
    status, _, reply = raw(server, "GET", "/healthz")
    assert status == 200 and reply == {"status": "ok"}
    status, _, reply = raw(server, "GET", "/readyz")
    assert status == 200 and reply["model"] == server.http.model_id


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_the_request(server: Server, stream: bool) -> None:
    before = server.scheduler.stats["cancelled"]
    requests = server.dispatcher.stats["request"]
    body = json.dumps(
        {"messages": QUESTION, "max_tokens": 200, "ignore_eos": True, "stream": stream}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.http.port), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert wait_for(lambda: server.dispatcher.stats["request"] > requests)  # it reached the scheduler
    if stream:
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # the stream has begun
    sock.close()
    assert wait_for(lambda: server.scheduler.stats["cancelled"] > before)


@pytest.fixture(scope="module")
def keyed(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, str]]:
    folder = tmp_path_factory.mktemp("http-keys")
    path = folder / "keys.json"
    key, slow = add_key(path, "app", Limits()), add_key(path, "slow", Limits(requests_per_minute=2))
    s = start(tiny_bundle, folder, keys=KeysConfig(file=str(path)))
    yield s, key, slow
    s.stop()


def test_keys_on_http(keyed: tuple[Server, str, str]) -> None:
    server, key, slow = keyed
    for wrong in ("ekl-wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            client(server, wrong or "unused", max_retries=0).chat.completions.create(
                model=server.http.model_id, messages=QUESTION, max_tokens=2
            )
    with pytest.raises(openai.AuthenticationError):
        client(server, "ekl-wrong", max_retries=0).models.list()
    status, _, body = raw(server, "POST", "/v1/chat/completions", json.dumps({"messages": QUESTION}).encode())
    assert status == 401 and body["error"]["type"] == "authentication_error"  # no header at all
    ok = client(server, key).chat.completions.create(
        model=server.http.model_id, messages=QUESTION, max_tokens=2
    )
    assert ok.choices[0].message.content is not None
    # Over its requests-per-minute: 429 with Retry-After, and exactly one answer per request.
    c = client(server, slow, max_retries=0)
    outcomes = []
    for _ in range(4):
        try:
            c.chat.completions.create(model=server.http.model_id, messages=QUESTION, max_tokens=2)
            outcomes.append(200)
        except openai.RateLimitError as exc:
            assert int(exc.response.headers["retry-after"]) >= 1
            assert exc.body["code"] == "rate_limit_exceeded"
            outcomes.append(429)
    assert outcomes == [200, 200, 429, 429]
    ready = raw(server, "GET", "/readyz")[0]
    assert ready == 200  # health endpoints need no key
    # Refusals are answered requests too: /metrics counts them by outcome (the error code).
    status, _, text = raw(server, "GET", "/metrics")
    counts = requests_total(text.decode())
    assert status == 200 and counts[("http", "unauthorized")] == 3  # completions only, not /v1/models
    assert counts[("http", "rate_limited")] == 2 and counts[("http", "completed")] == 3


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_against_edge_llm_serve(tiny_bundle: Path, tmp_path: Path) -> None:
    """The real command line: `edge-llm serve --http`, streamed and gzipped with curl."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_llm.cli", "serve", "--bundle", str(tiny_bundle),
         "--http", f"127.0.0.1:{port}", "--state", str(tmp_path / "state.sqlite")],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner, banner
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = json.dumps({"messages": QUESTION, "max_tokens": 6, "stream": True})
        out = subprocess.run(
            ["curl", "-sN", "-H", "Content-Type: application/json", "-d", body, url],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        packed = tmp_path / "body.gz"
        packed.write_bytes(gzip.compress(json.dumps({"messages": QUESTION, "max_tokens": 6}).encode()))
        out = subprocess.run(
            ["curl", "-s", "-H", "Content-Type: application/json", "-H", "Content-Encoding: gzip",
             "--data-binary", f"@{packed}", url],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        whole = json.loads(out)
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert whole["choices"][0]["message"]["content"] == streamed
    finally:
        proc.terminate()
        proc.wait(30)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_llm.errors import ConfigError

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "edge_llm.transports.http", raising=False)
    with pytest.raises(ConfigError, match=r"edge-llm\[http\]"):
        import edge_llm.transports.http  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_https_from_the_board_profile(tiny_bundle: Path, tmp_path: Path) -> None:
    """[http.tls] cert/key serve HTTPS; with ca, a client without a certificate is turned away."""
    import ssl

    sys.path.insert(0, str(ROOT / "tests"))
    from mosquitto import make_certs

    from edge_llm.board import ServerTlsConfig

    certs = make_certs(tmp_path / "certs")
    tls = ServerTlsConfig(cert=str(certs.server_cert), key=str(certs.server_key), ca=str(certs.ca))
    cfg = BoardConfig(http=HttpConfig(host="127.0.0.1", port=0, tls=tls))
    server = Server(Engine.load(tiny_bundle), cfg, state_path=tmp_path / "state.sqlite")
    server.start()
    try:
        assert server.http.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        c = openai.OpenAI(
            base_url=server.http.url + "/v1",
            api_key="unused",
            http_client=openai.DefaultHttpxClient(verify=ctx),
        )
        r = c.chat.completions.create(model=server.http.model_id, messages=QUESTION, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        anonymous = ssl.create_default_context(cafile=str(certs.ca))  # trusts the server, no client cert
        bare = openai.OpenAI(
            base_url=server.http.url + "/v1",
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=anonymous),
        )
        with pytest.raises(openai.APIConnectionError):
            bare.models.list()
    finally:
        server.stop()


def test_port_in_use_fails_start(server: Server) -> None:
    from edge_llm.errors import TransportError
    from edge_llm.transports.http import HttpTransport

    taken = HttpConfig(host="127.0.0.1", port=server.http.port)
    with pytest.raises(TransportError, match="cannot listen"):
        HttpTransport(server.dispatcher, taken, "m").start()


def test_a_swapped_bundle_is_the_served_model(tiny_bundle: Path, tmp_path: Path) -> None:
    """After a reload or an OTA switch, /v1/models names the new bundle and requests may name it."""
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_bundle, renamed)
    raw_manifest = json.loads((renamed / "bundle.json").read_text())
    raw_manifest["name"] = "tiny-renamed"
    (renamed / "bundle.json").write_text(json.dumps(raw_manifest))
    s = start(tiny_bundle, tmp_path / "state")
    try:
        before = client(s).models.list().data[0].id
        assert s.swap(Engine.load(renamed), timeout=30)
        assert [m.id for m in client(s).models.list().data] == ["tiny-renamed"] != [before]
        reply = client(s).chat.completions.create(model="tiny-renamed", messages=QUESTION, max_tokens=2)
        assert reply.model == "tiny-renamed"
    finally:
        s.stop()
