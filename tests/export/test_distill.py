"""Distillation on a tiny random Llama: lowers the KL on its training text, resumes after an interrupt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from edge_llm.errors import ExportError
from export import distill, evaluate, qa
from export.teacher import CHAT_ROWS
from export.text import read_span


def _config(text: Path, **kw: object) -> distill.DistillConfig:
    base = dict(
        text=text,
        span=(0.0, 1.0),
        tokens=32 * 4 * 24,
        seq_len=32,
        batch=4,
        grad_accum=1,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=5,
        threads=1,
    )
    return distill.DistillConfig(**{**base, **kw})  # type: ignore[arg-type]


def _kl(student: Path, teacher: Path, text: Path) -> float:
    tok = Tokenizer.from_file(str(teacher / "tokenizer.json"))
    ids = np.asarray(tok.encode(text.read_text(), add_special_tokens=False).ids[:512])
    s, _ = evaluate.torch_logits(student)
    t, _ = evaluate.torch_logits(teacher)
    return evaluate.score(ids, s, 64, 64, teacher=t)["kl_to_teacher"]


def test_distillation_lowers_kl_on_training_text(
    pair: tuple[Path, Path], text_file: Path, tmp_path: Path
) -> None:
    teacher, student = pair
    before = _kl(student, teacher, text_file)
    report = distill.run(
        _config(text_file, hidden_weight=0.5, ce_weight=0.1), teacher, student, tmp_path / "d", progress=False
    )
    after = _kl(tmp_path / "d", teacher, text_file)
    assert after < 0.85 * before, (before, after)
    assert report["steps"] == 24 and report["tokens_trained"] == 32 * 4 * 24
    assert set(report["last_loss"]) == {"step", "kl", "hidden", "ce"}
    assert not (tmp_path / "d" / distill.CHECKPOINT).exists()


def test_interrupted_distillation_resumes(
    pair: tuple[Path, Path], text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, student = pair
    cfg = _config(text_file, tokens=32 * 4 * 12)
    full = distill.run(cfg, teacher, student, tmp_path / "full", progress=False)

    real = distill._checkpoint

    def interrupt(path: Path, model: object, opt: object, state: dict) -> None:
        real(path, model, opt, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg, teacher, student, tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / distill.CHECKPOINT).is_file()
    monkeypatch.setattr(distill, "_checkpoint", real)
    resumed = distill.run(cfg, teacher, student, tmp_path / "cut", progress=False)
    assert resumed["resumed_at_steps"] == [5]
    assert resumed["steps"] == full["steps"] == 12
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_teacher_generated_text_is_added_and_kept_for_a_resume(
    pair: tuple[Path, Path], text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, student = pair
    cfg = _config(text_file, tokens=32 * 4 * 2, teacher_tokens=100)
    report = distill.run(cfg, teacher, student, tmp_path / "g", progress=False)
    assert report["text"]["teacher_tokens"] == 100 and report["steps"] == 2
    kept = json.loads((tmp_path / "g" / distill.TEACHER_TEXT).read_text())
    assert len(kept) == 100 and all(isinstance(i, int) for i in kept)

    # A rerun into the folder (the recipe's resume) trains on the same samples: sampling again
    # would give other tokens (generate() draws from torch's global generator).
    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("teacher text sampled again")

    monkeypatch.setattr(distill, "teacher_text", never)
    tok = distill.load_tokenizer(teacher)
    data, where = distill.training_ids(cfg, tok, None, "cpu", teacher, tmp_path / "g")
    assert where["teacher_tokens"] == 100
    assert data.reshape(-1)[where["text_tokens"] :].tolist() == kept[: data.size - where["text_tokens"]]


def test_teacher_written_chats_are_added(
    pair: tuple[Path, Path], text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, student = pair
    cfg = _config(text_file, tokens=32 * 4 * 2, chat_tokens=200, chat_max_answer=16)
    tok = distill.load_tokenizer(teacher)
    chats = distill.teacher_chats(_model(teacher), teacher, 200, 16, 0, "cpu")
    assert sum(len(c) for c, _ in chats) >= 200
    end = "<|im_end|>"
    for chat, prompt_len in chats:
        assert tok.decode(chat[:prompt_len], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
        text = tok.decode(chat, skip_special_tokens=False)
        # the template's user turn with a question the teacher wrote, the template's assistant
        # turn, and the answer: cut at its end of turn, which stays (the student learns to stop)
        assert text.startswith("<|im_start|>user\n"), text
        question, answer = text.removeprefix("<|im_start|>user\n").split(f"{end}\n<|im_start|>assistant\n")
        assert question.strip() and end not in question
        assert end not in answer.removesuffix(end)
        assert len(chat) - prompt_len <= 16 + 1
    report = distill.run(cfg, teacher, student, tmp_path / "c", progress=False)
    assert report["text"]["chat_tokens"] >= 200 and report["text"]["chat_turns"] == len(chats)
    assert "<|im_start|>assistant" in report["text"]["chat_example"]
    # kept beside the student; a rerun into the folder (a resume) reads them instead of writing anew
    kept = json.loads((tmp_path / "c" / distill.CHATS).read_text())
    assert sum(len(c) for c in kept) == report["text"]["chat_tokens"]

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("chats written again")

    monkeypatch.setattr(distill, "teacher_chats", never)
    again = distill.run(cfg, teacher, student, tmp_path / "c", progress=False)
    assert again["text"]["chat_tokens"] == report["text"]["chat_tokens"]


def test_question_turns_and_excluded_qa(
    pair: tuple[Path, Path], text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A questions file: the teacher answers each (kept beside the student); a file asking an
    evaluation question again is refused, and teacher-written chats that ask one are dropped."""
    teacher, student = pair
    qa_set = tmp_path / "qa.jsonl"
    qa_set.write_text(
        '{"question": "What is the capital of France?", "answers": ["Paris"], "category": "g"}\n'
        '{"question": "How many legs does a spider have?", "answers": ["8"], "category": "s"}\n'
    )
    asked = tmp_path / "q.txt"
    asked.write_text("# training only\nWhat is the capital of Norway?\n\nHow many legs does a dog have?\n")
    cfg = _config(text_file, tokens=32 * 4 * 2, questions=asked, exclude_qa=qa_set, chat_max_answer=8)
    report = distill.run(cfg, teacher, student, tmp_path / "c", progress=False)
    assert report["text"]["question_turns"] == 2 and "chat_turns" not in report["text"]
    tok = distill.load_tokenizer(teacher)
    turns = json.loads((tmp_path / "c" / distill.QUESTIONS).read_text())
    assert "What is the capital of Norway?" in tok.decode(turns[0], skip_special_tokens=False)
    assert report["text"]["chat_tokens"] == sum(len(t) for t in turns)

    asked.write_text("What is the capital of Norway?\nWhat's the capital of France, please?\n")
    with pytest.raises(ExportError, match=r"asks evaluation questions again.*France"):
        distill.run(cfg, teacher, student, tmp_path / "d", progress=False)

    # Chats: the teacher's questions pass the same test before they are answered.
    from export import teacher as teacher_mod

    seen: list[str] = []
    monkeypatch.setattr(
        teacher_mod.hf_tokenizer(teacher).__class__, "decode", _fixed_questions(seen), raising=True
    )
    keep = qa.unlike(qa.load(qa_set))
    chats = teacher_mod.chats(_model(teacher), teacher, 20, 8, 0, "cpu", keep)
    assert seen and len(chats) == CHAT_ROWS // 2  # every other question was the spider one


def _fixed_questions(seen: list[str]) -> object:
    """A tokenizer decode that makes the teacher's questions alternate between an evaluation
    question and another one (the random tiny teacher writes no real questions)."""

    def decode(self: object, ids: object, **_k: object) -> str:
        seen.append("x")
        return "How many legs does a spider have?" if len(seen) % 2 else "How many legs does a cat have?"

    return decode


def _model(path: Path) -> object:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_bad_distill_config_rejected() -> None:
    with pytest.raises(ValueError, match="distill"):
        distill.DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="distill"):
        distill.DistillConfig(kl_weight=0, hidden_weight=0, ce_weight=0)


def test_schedule_warms_up_and_decays() -> None:
    cfg = distill.DistillConfig(tokens=256 * 8 * 100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [distill.lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)
    capped = distill.DistillConfig(tokens=256 * 8 * 100, lr=1e-3, warmup_steps=10, max_minutes=10.0)
    assert distill.lr_at(capped, 20, seconds=600.0) == pytest.approx(1e-4)  # the clock ran out
    assert distill.lr_at(capped, 20, seconds=0.0) == pytest.approx(distill.lr_at(cfg, 20))
    with pytest.raises(ValueError, match="overlaps the training span"):
        distill.DistillConfig(eval_every=5, span=(0.0, 1.0), eval_span=(0.0, 0.1))


def test_learning_curve_on_held_out_text(pair: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    """Held-out perplexity at the start, every eval_every steps and at the end; it falls, and the
    first point is the undistilled student's perplexity as `evaluate` measures it."""
    teacher, student = pair
    cfg = _config(
        text_file, span=(0.3, 1.0), eval_every=5, eval_span=(0.0, 0.3), eval_tokens=256, eval_context=64
    )
    report = distill.run(cfg, teacher, student, tmp_path / "c", progress=False)
    curve = report["curve"]
    assert [c["tokens"] for c in curve] == [0, 640, 1280, 1920, 2560, 3072]
    assert curve[-1]["perplexity"] < curve[0]["perplexity"]
    tok = Tokenizer.from_file(str(teacher / "tokenizer.json"))
    text, _ = read_span(text_file, (0.0, 0.3))
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids[:256])
    logits, _ = evaluate.torch_logits(student)
    assert curve[0]["perplexity"] == pytest.approx(
        evaluate.score(ids, logits, 64, 64)["perplexity"], rel=1e-3
    )


def test_training_ids_refuses_teacher_tokens_for_a_trimmed_vocabulary(
    pair: tuple[Path, Path], text_file: Path
) -> None:
    """`run` refuses this before loading anything; `training_ids` (public) keeps its own guard so a
    direct caller never gets teacher-vocabulary ids appended to a trimmed student's data."""
    teacher, _ = pair
    cfg = _config(text_file, tokens=32 * 4 * 2, teacher_tokens=100)
    tok = distill.load_tokenizer(teacher)
    with pytest.raises(ExportError, match="trimmed vocabulary"):
        distill.training_ids(cfg, tok, None, "cpu", teacher, None, convert=lambda ids: ids)
