"""benchmarks/prune_tradeoff.py: the teacher's answers are read back from an eval JSON (either
kind) and rescored; one for another QA set is refused. (The sweep itself runs the real model.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import prune_tradeoff  # noqa: E402
from export import qa  # noqa: E402


def test_teacher_answers_from_an_eval_json(tmp_path: Path) -> None:
    qa_file = tmp_path / "qa.jsonl"
    rows = [{"question": "Capital of France?", "answers": ["Paris"], "category": "g"},
            {"question": "Days in a week?", "answers": ["7"], "category": "g"}]  # fmt: skip
    qa_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = qa.load(qa_file)
    teacher = qa.scored(questions, ["It is Paris.", "Five."])
    model = qa.scored(questions, ["Rome.", "Seven days."])
    with_teacher = tmp_path / "bundle_vs_teacher.json"
    with_teacher.write_text(json.dumps({"qa_items": qa.with_teacher(model, teacher)}))
    own = tmp_path / "teacher_itself.json"
    own.write_text(json.dumps({"qa_items": teacher}))
    for path in (with_teacher, own):
        got = prune_tradeoff.teacher_rows(path, qa_file)
        assert [r["answer"] for r in got] == ["It is Paris.", "Five."]
        assert [r["ok"] for r in got] == [True, False]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "Other?", "answers": ["x"], "category": "g"}) + "\n")
    with pytest.raises(SystemExit, match="another QA set"):
        prune_tradeoff.teacher_rows(own, other)


def test_teacher_known_asks_only_what_the_teacher_got_right(tmp_path: Path) -> None:
    qa_file = tmp_path / "qa.jsonl"
    rows = [{"question": "Capital of France?", "answers": ["Paris"], "category": "g"},
            {"question": "Days in a week?", "answers": ["7"], "category": "g"}]  # fmt: skip
    qa_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = qa.scored(qa.load(qa_file), ["Five.", "Seven days."])
    known, kept_file, kept = prune_tradeoff.teacher_known(teacher, qa_file, tmp_path)
    assert known == [1] and [q.question for q in qa.load(kept_file)] == ["Days in a week?"]
    assert [r["answer"] for r in kept] == ["Seven days."]


def test_quant_qa_variants_are_valid_quantize_configs() -> None:
    from dataclasses import replace

    from benchmarks import quant_qa
    from export.quantize import QuantizeConfig

    for name, keys in quant_qa.VARIANTS.items():
        assert replace(QuantizeConfig(), **keys), name
    assert quant_qa.VARIANTS["default"] == {}
