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
