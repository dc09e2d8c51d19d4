"""The draft stage's config checks (the stage itself runs in tests/edge_llm/test_speculate.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


def test_training_anneals_within_the_time_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut off by `max_minutes`, training still warms up to the peak rate and anneals to ~0
    (the 2026-12-04 draft stopped at 153 of 925 planned steps with its schedule at full rate)."""
    from export import train_draft
    from export.train_draft import Corpus, make_head, train

    clock = iter(range(0, 10**6, 1))  # a slow host: every reading of the clock is a second later
    monkeypatch.setattr(train_draft, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))

    rng = np.random.default_rng(0)
    n, h, v = 512, 16, 32
    corpus = Corpus(
        rng.integers(0, v, n), rng.standard_normal((n, h)).astype(np.float16),
        rng.integers(0, v, n).astype(np.int32), np.array([0]), np.array([n]),
    )  # fmt: skip
    vmap = np.append(np.arange(v - 1), v)  # token v-1 outside the draft vocabulary (row v)
    head = make_head(rng.standard_normal((v + 1, h)).astype(np.float32), 8, 1e-6)
    config = DraftConfig(tokens=n, seq_len=8, batch=8, epochs=10_000.0, max_minutes=1.0, threads=1)
    fit = train(head, corpus, vmap, config, progress=False)
    assert fit["steps"] < fit["planned_steps"]  # the time cap ended it
    assert fit["lr_peak"] > 0.5 * config.lr
    assert fit["lr_last"] < 0.05 * config.lr


def test_teacher_answers_greedily_when_asked(tiny_hf: Path) -> None:
    """chat_greedy: the teacher's answers do not depend on the sampling seed (they do sampled)."""
    import torch

    from export import teacher
    from export.hf import special_ids

    model = teacher.load_model(tiny_hf, "cpu", 1)
    tok = teacher.hf_tokenizer(tiny_hf)
    stop = special_ids(tiny_hf)[1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    questions = ["What is the capital of France?", "Name a colour."]

    def answer(seed: int, greedy: bool) -> list[tuple[list[int], int]]:
        torch.manual_seed(seed)
        return teacher._answer(model, tok, questions, 16, stop, pad, "cpu", greedy)

    assert answer(1, True) == answer(2, True)
    assert answer(1, False) != answer(2, False)


def test_batched_greedy_answers_equal_one_at_a_time(tiny_hf: Path) -> None:
    """teacher.greedy_batch (the QA check's loop, which now writes the draft's chats): left-padded
    rows of different lengths, rows leaving the batch as they stop (shrink), give each prompt the
    tokens it gets alone, and what HF `generate` gives greedily."""
    import torch

    from export import teacher

    model = teacher.load_model(tiny_hf, "cpu", 1)
    tok = teacher.hf_tokenizer(tiny_hf)
    questions = ["What is the capital of France?", "Hi", "Name three colours of the rainbow, please.", "Why?"]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    free = [teacher.greedy_batch(model, [p], 20, set())[0][0] for p in prompts]
    # A stop id each row meets at another step (or never): rows end at different times.
    stop = {free[0][3], free[2][9]}
    alone = [teacher.greedy_batch(model, [p], 20, stop)[0] for p in prompts]
    assert len({len(new) for new, _ in alone}) > 1 and any(ended for _, ended in alone)
    assert teacher.greedy_batch(model, prompts, 20, stop, shrink=True) == alone
    assert teacher.greedy_batch(model, prompts, 20, stop) == alone
    # HF generate, greedy, on the same left-padded batch (what chats used before)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=sorted(stop),
            pad_token_id=0,
        )[:, width:].tolist()
    assert [teacher.until(o, sorted(stop)) for o in out] == [new for new, _ in alone]


def test_teacher_chats_are_cached(tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher writes a draft's chats once per teacher and chat settings: another draft kind
    over the same teacher reads them from the export cache."""
    from dataclasses import replace

    from export import teacher, train_draft

    calls: list[int] = []
    real = teacher.chats

    def counted(*args: object, **kwargs: object) -> list[tuple[list[int], int]]:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(teacher, "chats", counted)
    config = DraftConfig(text=tmp_path / "t.txt", chat_tokens=97, chat_max_answer=8, threads=1, chat_seed=5)
    first = train_draft.chat_rows(config, tiny_hf)
    again = train_draft.chat_rows(replace(config, kind="eagle1"), tiny_hf)
    assert calls == [1] and first == again and sum(len(ids) for ids, _ in first) >= 97
    train_draft.chat_rows(replace(config, chat_seed=6), tiny_hf)
    assert calls == [1, 1]  # other settings: written again
