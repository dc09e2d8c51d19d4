"""Slow: the real default model, exported through the README's path, answers a real question."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_llm.engine import Engine
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("EDGE_LLM_BUNDLE")
    if given:
        return Path(given)
    from export import recipe

    return recipe.run(
        recipe.load_recipe(Path(__file__).parents[1] / "configs/recipes/smollm2-int8.toml"),
        tmp_path_factory.mktemp("smollm2") / "bundle",
    )


def test_default_bundle_answers_paris(smollm2_bundle: Path) -> None:
    engine = Engine.load(smollm2_bundle)
    ids = engine.encode_request(messages=[{"role": "user", "content": "What is the capital of France?"}])
    final = engine.complete(ids, SamplingParams(max_tokens=48))
    assert "Paris" in final.text, final.text


def test_openai_client_gets_paris_over_http_with_keys(smollm2_bundle: Path, tmp_path: Path) -> None:
    """Issue 15's check: the official `openai` client, streaming and not, a wrong key, and a key
    over its requests-per-minute (429 with Retry-After; every request one answer)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from edge_llm.board import BoardConfig, HttpConfig, KeysConfig
    from edge_llm.keys import Limits, add_key
    from edge_llm.server import Server

    keys = tmp_path / "keys.json"
    key, slow = add_key(keys, "app", Limits()), add_key(keys, "slow", Limits(requests_per_minute=2))
    board = BoardConfig(http=HttpConfig(host="127.0.0.1", port=0), keys=KeysConfig(file=str(keys)))
    server = Server(Engine.load(smollm2_bundle), board, state_path=tmp_path / "state.sqlite")
    server.start()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    url = server.http.url + "/v1"
    try:
        c = openai.OpenAI(base_url=url, api_key=key)
        model = c.models.list().data[0].id
        r = c.chat.completions.create(model=model, messages=question, max_tokens=48)
        assert "Paris" in r.choices[0].message.content
        stream = c.chat.completions.create(model=model, messages=question, max_tokens=48, stream=True)
        assert "Paris" in "".join(ch.choices[0].delta.content or "" for ch in stream)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="ekl-wrong").chat.completions.create(
                model=model, messages=question
            )
        s = openai.OpenAI(base_url=url, api_key=slow, max_retries=0)
        statuses = []
        for _ in range(3):
            try:
                s.chat.completions.create(model=model, messages=question, max_tokens=4)
                statuses.append(200)
            except openai.RateLimitError as exc:
                assert int(exc.response.headers["retry-after"]) >= 1
                statuses.append(429)
        assert statuses == [200, 200, 429]
    finally:
        server.stop()


def test_grpc_streams_paris(smollm2_bundle: Path, tmp_path: Path) -> None:
    """A client generated from llm.proto streams the default model's answer over gRPC."""
    grpc = pytest.importorskip("grpc")
    from edge_llm.board import BoardConfig, GrpcConfig
    from edge_llm.proto import llm_pb2, llm_pb2_grpc
    from edge_llm.server import Server

    server = Server(
        Engine.load(smollm2_bundle), BoardConfig(grpc=GrpcConfig(listen="127.0.0.1:0")), tmp_path / "s.sqlite"
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            msg = llm_pb2.Message(role="user", content="What is the capital of France?")
            request = llm_pb2.ChatRequest(messages=[msg], max_tokens=48, stream=True)
            replies = list(stub.Chat(request, timeout=300))
    finally:
        server.stop()
    *chunks, last = replies
    assert chunks and last.HasField("final")
    assert "".join(r.content for r in chunks) == last.final.text
    assert "Paris" in last.final.text, last.final.text
