"""The draft stage's config checks (the stage itself runs in tests/edge_llm/test_speculate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.recipe import Recipe
from export.to_onnx import ToOnnxConfig
from export.train_draft import DraftConfig


def test_draft_needs_the_fused_graph_with_tail_logits(tmp_path: Path) -> None:
    draft = DraftConfig(text=tmp_path / "t.txt")
    with pytest.raises(ValueError, match=r"\[draft\] needs the fused graph"):
        Recipe(to_onnx=ToOnnxConfig(graph="optimum"), draft=draft)
    with pytest.raises(ValueError, match=r"\[draft\] needs the fused graph"):
        Recipe(to_onnx=ToOnnxConfig(graph="fused", logits="last"), draft=draft)
    with pytest.raises(ValueError, match=r"draft\.text"):
        Recipe(to_onnx=ToOnnxConfig(graph="fused"), draft=DraftConfig())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("eval_span", (0.5, 1.0), "overlaps"),
        ("vocab", 1, "vocab"),
        ("unroll", 0, "unroll"),
        ("k", 17, "k in"),
        ("lr", 0.0, "lr"),
        ("tokens", 4, "tokens"),
    ],
)
def test_bad_draft_config_rejected(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DraftConfig(**{field: value})  # type: ignore[arg-type]
