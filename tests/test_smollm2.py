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
