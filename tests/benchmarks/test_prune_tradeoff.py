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


def test_levels_take_their_layers_from_the_one_kl_order() -> None:
    """A level drops the first n layers of the shared KL search and trims in merge order (as the
    pruned recipe); a level deeper than the search is refused before any work."""
    import argparse

    args = argparse.Namespace(text="/x/valid.txt", calib_tokens=512)
    order = [13, 12, 26, 14, 17]
    recipe = prune_tradeoff.level_recipe("v16_h34_d3", prune_tradeoff.LEVELS["v16_h34_d3"], order, args)
    assert recipe.trim_vocab is not None and recipe.trim_vocab.size == recipe.trim_vocab.prior == 16384
    assert recipe.prune is not None and recipe.prune.layers == (13, 12, 26)
    assert recipe.prune.head_ratio == 0.34 and recipe.prune.layer_ratio == 0 and recipe.evaluate is None
    vocab_only = prune_tradeoff.level_recipe("v20", prune_tradeoff.LEVELS["v20"], [], args)
    assert vocab_only.prune is None and vocab_only.trim_vocab is not None
    with pytest.raises(SystemExit, match="--kl-depth"):
        prune_tradeoff.level_recipe("v8_d8", prune_tradeoff.LEVELS["v8_d8"], order, args)
    assert set(prune_tradeoff.DEFAULT_LEVELS) <= set(prune_tradeoff.LEVELS)
