"""Evaluation: sliding windows score each token once; bundle and torch perplexities agree; the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge_llm.cli import main
from edge_llm.errors import ExportError
from export import evaluate, text
from tests.conftest import TRAIN_TEXT


@pytest.mark.parametrize(("n", "ctx", "stride"), [(100, 32, 32), (100, 32, 8), (31, 32, 16), (64, 16, 5)])
def test_windows_score_every_token_once(n: int, ctx: int, stride: int) -> None:
    """Overlapping windows score every token after the first; stride == context skips window starts."""
    scored: list[int] = []
    for begin, end, first in evaluate.windows(n, ctx, stride):
        assert end - begin <= ctx and begin < first <= end
        scored += range(first, end)
    skipped = set(range(ctx, n, ctx)) if stride == ctx else set()
    assert scored == [i for i in range(1, n) if i not in skipped]


def test_uniform_model_has_vocabulary_perplexity() -> None:
    ids = np.arange(40) % 7
    result = evaluate.score(ids, lambda w: np.zeros((len(w), 50), np.float32), 16, 16)
    assert result["perplexity"] == pytest.approx(50.0)
    both = evaluate.score(
        ids,
        lambda w: np.zeros((len(w), 50), np.float32),
        16,
        8,
        teacher=lambda w: np.zeros((len(w), 50), np.float32),
    )
    assert both["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9) and both["top1_agreement"] == 1.0


def test_bundle_perplexity_matches_transformers(tiny_hf: Path, tiny_bundle: Path, tiny_text: Path) -> None:
    cfg = evaluate.EvaluateConfig(
        text=tiny_text,
        span=(0.0, 1.0),
        max_tokens=300,
        context=64,
        stride=32,
        speed_tokens=4,
        speed_prompt=8,
        speed_runs=1,
    )
    onnx = evaluate.run(cfg, tiny_bundle, tiny_hf, progress=False)
    torch_ = evaluate.run(cfg, tiny_hf, None, progress=False)
    assert onnx["perplexity"] == pytest.approx(torch_["perplexity"], rel=1e-4)
    assert onnx["teacher_perplexity"] == pytest.approx(onnx["perplexity"], rel=1e-4)
    assert onnx["kl_to_teacher"] < 1e-6 and onnx["top1_agreement"] == 1.0
    assert onnx["scored_tokens"] == 299 and onnx["text"]["stride"] == 32
    assert onnx["decode_tok_s"] > 0 and onnx["ttft_s"] > 0
    assert onnx["parameters"] == torch_["parameters"] > 0 and onnx["size_bytes"] > 0
    assert math.isfinite(onnx["nll"])


def test_chat_answers_compared_with_the_teacher(tiny_hf: Path, tiny_bundle: Path, tiny_text: Path) -> None:
    cfg = evaluate.EvaluateConfig(
        text=tiny_text,
        span=(0.0, 1.0),
        max_tokens=100,
        context=64,
        stride=64,
        speed=False,
        chat_tokens=150,
        chat_max_answer=12,
    )
    same = evaluate.run(cfg, tiny_bundle, tiny_hf, progress=False)  # the teacher's own export
    assert same["chat_turns"] >= 1 and same["chat_scored_tokens"] >= same["chat_turns"]
    assert same["chat_kl_to_teacher"] < 1e-5 and same["chat_top1_agreement"] == 1.0
    assert same["chat_perplexity"] == pytest.approx(same["teacher_chat_perplexity"], rel=1e-4)
    # Scored on the answers only: a model that differs only on the prompt tokens agrees fully.
    chats = [([3, 4, 5, 6, 7], 3)]
    flat = lambda w: np.tile(np.arange(50, dtype=np.float32), (len(w), 1))  # noqa: E731
    prompt_off = lambda w: np.vstack([np.zeros((1, 50), np.float32), flat(w)[1:]])  # noqa: E731
    scored = evaluate.score_chats(chats, prompt_off, flat)
    assert scored["chat_scored_tokens"] == 2 and scored["chat_top1_agreement"] == 1.0
    assert scored["chat_kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert "chat answers" in evaluate.headline(same)


def test_eval_command_prints_and_writes_json(
    tiny_bundle: Path, tiny_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval",
            "--bundle",
            str(tiny_bundle),
            "--text",
            str(tiny_text),
            "--json",
            str(out),
            "--max-tokens",
            "200",
            "--context",
            "64",
            "--stride",
            "64",
            "--no-speed",
        ]
    )
    assert rc == 0
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["scored_tokens"] == 200 - 4 and result["text"]["context"] == 64


def test_eval_command_rejects_bad_window(tiny_bundle: Path, tiny_text: Path) -> None:
    assert main(["eval", "--bundle", str(tiny_bundle), "--text", str(tiny_text), "--stride", "1000"]) == 2


def test_eval_command_chat_needs_a_teacher(
    tiny_bundle: Path, tiny_hf: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["eval", "--bundle", str(tiny_bundle), "--text", str(tiny_text), "--no-speed"]
    common += ["--max-tokens", "100", "--context", "64", "--stride", "64", "--chat-tokens", "50"]
    assert main(common) == 2
    assert "--chat-tokens needs --teacher" in capsys.readouterr().err
    assert main([*common, "--teacher", str(tiny_hf)]) == 0
    assert "chat answers: KL" in capsys.readouterr().out


def test_relative_text_resolves_against_cwd_then_repo_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert text.resolve_text(Path("pyproject.toml")) == text.REPO_ROOT / "pyproject.toml"
    (tmp_path / "pyproject.toml").write_text("mine")
    assert text.resolve_text(Path("pyproject.toml")) == tmp_path / "pyproject.toml"
    with pytest.raises(ExportError, match=r"evaluate\.text: text file no/such/file\.txt not found \(looked"):
        text.resolve_text(Path("no/such/file.txt"), "evaluate.text")
    with pytest.raises(ExportError, match="no text file given"):
        text.resolve_text(None, "evaluate.text")


def test_first_tokens_match_encoding_the_whole_text(tiny_hf: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    whole = "\n".join(TRAIN_TEXT * 40)

    def encode(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False).ids

    seen: list[int] = []
    for count in (1, 100, 1000, 5000):
        got = text.first_tokens(whole, lambda s: seen.append(len(s)) or encode(s), count)
        assert got == encode(whole)[:count]
    assert max(seen) < len(whole)  # the short counts did not tokenize the whole text
