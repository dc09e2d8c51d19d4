"""benchmarks/distill_curve.py on the tiny teacher and student: a run's snapshots are found in
token order with the final student last, and each is measured (text, chats, QA) as one row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import distill_curve  # noqa: E402
from export import distill, evaluate, qa  # noqa: E402
from export.teacher import chats as teacher_chats  # noqa: E402
from export.teacher import torch_logits  # noqa: E402
from tests.export.test_distill import _config  # noqa: E402


def test_snapshots_measured_in_order(pair: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    teacher, student = pair
    run = tmp_path / "run"
    distill.run(
        _config(text_file, tokens=32 * 4 * 4, save_at=(256, 128)), teacher, student, run, progress=False
    )
    found = distill_curve.snapshots(run)
    assert [(t, p.name) for t, p in found] == [(128, "at-128"), (256, "at-256"), (512, "run")]

    qa_file = tmp_path / "qa.jsonl"
    items = [{"question": "What is the capital of France?", "answers": ["Paris"], "category": "g"},
             {"question": "How many days are in a week?", "answers": ["7"], "category": "g"}]  # fmt: skip
    qa_file.write_text("".join(json.dumps(r) + "\n" for r in items))
    questions = qa.load(qa_file)
    ecfg = evaluate.EvaluateConfig(text=text_file, span=(0.0, 1.0), max_tokens=256, context=64, stride=64)
    t_logits, t_model = torch_logits(teacher, 1)
    chats = teacher_chats(t_model, teacher, 200, 16, 1, "cpu")
    # The teacher "knows" both answers here (its scored rows say so), whatever it would say.
    known = qa.scored(questions, ["Paris.", "7."])
    row = distill_curve.point(ecfg, 512, run, teacher, t_logits, chats, questions, known)
    assert row["tokens"] == 512 and row["qa_teacher_correct"] == 2
    assert 0 <= row["qa_retained_count"] <= 2 and 0 <= row["chat_top1_agreement"] <= 1
    assert row["perplexity"] > 1 and row["kl_to_teacher"] > 0
    lines = distill_curve.table([row])
    assert lines[-1].startswith("| 512 | ")
