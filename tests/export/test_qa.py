"""Knowledge check (export/qa.py): the scoring rule, retention arithmetic, the QA set file, the
evaluate stage's qa fields (bundle through the runtime, teacher through torch) and the CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edge_llm.cli import main
from edge_llm.errors import ExportError
from export import evaluate, qa, report
from export.text import REPO_ROOT

QA_SET = REPO_ROOT / "configs" / "qa" / "general-v1.jsonl"


# ------------------------------------------------------------------------------ scoring rule


@pytest.mark.parametrize(
    ("answer", "accepted", "exact", "normalised"),
    [
        ("The capital of France is Paris.", ["Paris"], True, True),
        ("the capital of france is paris", ["Paris"], False, True),  # case
        ("Paris!", ["Paris"], True, True),
        ("There are seven days in a week.", ["7"], False, True),  # number word -> digits
        ("There are 7 days in a week.", ["7"], True, True),
        ("It is twenty-five.", ["25"], False, True),
        ("A hundred and five people.", ["105"], False, True),
        ("It has 1,000 meters.", ["1000"], False, True),  # thousands separator
        ("There are 17 of them.", ["7"], False, False),  # whole words only
        ("The Blue Whale is the largest.", ["blue whale"], False, True),
        ("It is the blue big whale.", ["blue whale"], False, False),  # a contiguous run of words
        ("Water is H2O.", ["H2O"], True, True),
        ("The kitchen", ["kitchen"], True, True),  # articles dropped
        ("Leonardo da Vinci painted it.", ["Mona", "da Vinci"], True, True),  # any accepted answer
    ],
)
def test_match(answer: str, accepted: list[str], exact: bool, normalised: bool) -> None:
    assert qa.match(answer, accepted) == (exact, normalised)


def test_only_the_first_sentence_counts() -> None:
    assert qa.match("It is Rome. Paris is in France.", ["Paris"]) == (False, False)
    # a short opener does not count as the sentence: the next one is read
    assert qa.match("Sure! The capital of France is Paris. Rome is not.", ["Paris"]) == (True, True)
    assert qa.first_sentence("Sure! The answer is 3.14 here. More.") == "Sure! The answer is 3.14 here."
    assert qa.first_sentence("  no end mark  ") == "no end mark"


def test_normalise() -> None:
    assert qa.normalise("The Answer: twenty-one, an apple & a pear.") == ["answer", "21", "apple", "pear"]
    assert qa.normalise("one hundred and twenty three thousand") == ["123000"]
    assert qa.normalise("zero") == ["0"] and qa.normalise("3.5 kg") == ["3.5", "kg"]
    assert qa.normalise("salt and pepper") == ["salt", "and", "pepper"]  # "and" outside a number


# ------------------------------------------------------------------------------ retention


def _rows(marks: list[tuple[bool, bool]], answers: list[str] | None = None) -> list[dict]:
    return [
        {"question": f"q{i}", "category": "c" if i % 2 else "d", "answer": (answers or [""] * 99)[i],
         "exact": e, "ok": n}
        for i, (e, n) in enumerate(marks)
    ]  # fmt: skip


def test_retention_arithmetic() -> None:
    # the teacher: 4 right by the normalised rule (q0-q3), 2 of them exactly (q0, q1)
    teacher = _rows([(True, True), (True, True), (False, True), (False, True), (False, False)], list("abcde"))
    # the model: right on q0 (exact), q2, and q4 (which the teacher missed: not in retention)
    model = _rows([(True, True), (False, False), (False, True), (False, False), (True, True)], list("axcye"))
    s = qa.summary(model, teacher)
    assert s["qa_questions"] == 5 and s["qa_correct"] == 3 and s["qa_correct_exact"] == 2
    assert s["qa_accuracy"] == pytest.approx(0.6) and s["qa_accuracy_exact"] == pytest.approx(0.4)
    assert s["qa_teacher_correct"] == 4 and s["qa_teacher_correct_exact"] == 2
    assert s["qa_retained_count"] == 2 and s["qa_retained"] == pytest.approx(0.5)
    assert s["qa_retained_exact"] == pytest.approx(0.5)  # q0 kept, q1 lost
    assert s["qa_same_answer"] == pytest.approx(3 / 5)  # a, c, e
    assert s["qa_by_category"]["d"] == {"questions": 3, "correct": 3, "teacher_correct": 2, "retained": 2}
    assert s["qa_by_category"]["c"] == {"questions": 2, "correct": 0, "teacher_correct": 2, "retained": 0}
    alone = qa.summary(model)
    assert "qa_retained" not in alone and alone["qa_correct"] == 3


def test_retention_undefined_when_the_teacher_knows_nothing() -> None:
    nothing = _rows([(False, False)] * 3)
    s = qa.summary(_rows([(True, True)] * 3), nothing)
    assert s["qa_teacher_correct"] == 0 and s["qa_retained"] is None and s["qa_retained_exact"] is None
    assert "n/a" in evaluate.qa_line({**s, "qa_file": "x"})


def test_teacher_rows_must_be_for_the_same_questions() -> None:
    other = [{**r, "question": "other"} for r in _rows([(True, True)])]
    with pytest.raises(ExportError, match="other questions"):
        qa.summary(_rows([(True, True)]), other)


def test_teacher_rows_round_trip() -> None:
    model = _rows([(True, True), (False, False)], ["x", "y"])
    teacher = _rows([(False, True), (True, True)], ["a", "b"])
    both = qa.with_teacher(model, teacher)
    assert qa.teacher_rows(both) == teacher and qa.teacher_rows(model) is None


# ------------------------------------------------------------------------------ the QA set


def test_the_shipped_qa_set() -> None:
    items = qa.load(QA_SET)
    assert len(items) >= 100
    assert len({q.question for q in items}) == len(items)
    cats = {q.category for q in items}
    assert {"geography", "science", "arithmetic", "units", "device", "general"} <= cats
    assert all(q.answers and all(qa.normalise(a) for a in q.answers) for q in items)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('["a"]', "expected an object"),
        ('{"question": "q", "answers": ["b"]}', "missing keys \\['category'\\]"),
        ('{"question": "q", "answers": ["b"], "category": "c", "hint": 1}', "unknown keys \\['hint'\\]"),
        ('{"question": "q", "answers": [], "category": "c"}', "non-empty list"),
        ('{"question": "q", "answers": ["?!"], "category": "c"}', "a word in it"),
        ('{"question": "q", "answers": ["the"], "category": "c"}', "a word in it"),  # only an article
        ('{"question": "", "answers": ["b"], "category": "c"}', "non-empty"),
    ],
)
def test_bad_qa_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok?", "answers": ["b"], "category": "c"}\n' + line + "\n")
    with pytest.raises(ExportError, match=f"bad.jsonl:2: .*{message}"):
        qa.load(path)


def test_empty_or_missing_qa_set(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ExportError, match="no questions"):
        qa.load(tmp_path / "empty.jsonl")
    with pytest.raises(ExportError, match="cannot read"):
        qa.load(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------------------ on the tiny model

QUESTIONS = ["What is the capital of France?", "Small models run where?", "def add(a, b):"]


def _qa_file(path: Path, answers: list[list[str]]) -> Path:
    rows = [{"question": q, "answers": a, "category": "t"} for q, a in zip(QUESTIONS, answers, strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def teacher_answers(tiny_hf: Path) -> list[str]:
    """What the tiny teacher answers (torch path), to build a QA set it gets right."""
    from export.teacher import load_model

    items = [qa.Question(q, ("x",), "t") for q in QUESTIONS]
    return qa.answer_torch(load_model(tiny_hf), tiny_hf, items, 8)


def test_bundle_and_teacher_answer_the_same_way(
    tiny_hf: Path, tiny_bundle: Path, teacher_answers: list[str], tmp_path: Path
) -> None:
    """The fp32 bundle (runtime, no torch) gives the teacher's (torch) answers: same template, same
    greedy loop, same stops; so a QA set the teacher answers is fully retained."""
    from edge_llm.engine import Engine

    engine = Engine.load(tiny_bundle)
    items = [qa.Question(q, ("x",), "t") for q in QUESTIONS]
    assert qa.answer_bundle(engine, items, 8) == teacher_answers
    # stopped at a newline or 8 tokens (decoded random bytes do not re-encode to the same count)
    assert all("\n" not in a for a in teacher_answers) and any(teacher_answers)
    # accepted answer = the first word the teacher said (with a word in it), or an impossible one
    accepted = [[next((w for w in a.split() if qa.normalise(w)), "zzz")] for a in teacher_answers]
    path = _qa_file(tmp_path / "qa.jsonl", accepted)
    cfg = evaluate.EvaluateConfig(qa=path, qa_max_tokens=8)
    res = evaluate.run(cfg, tiny_bundle, tiny_hf, progress=False)
    known = sum(1 for a in teacher_answers if any(qa.normalise(w) for w in a.split()))
    assert res["qa_teacher_correct"] == known and res["qa_questions"] == 3
    assert res["qa_same_answer"] == 1.0 and res["qa_correct"] == known
    assert res["qa_retained"] == (1.0 if known else None)
    assert [r["teacher_answer"] for r in res["qa_items"]] == teacher_answers
    assert "perplexity" not in res  # no text given: the QA set only
    assert "QA " in evaluate.headline(res)
    alone = evaluate.run(cfg, tiny_hf, None, progress=False)  # the HF folder itself, torch path
    assert [r["answer"] for r in alone["qa_items"]] == teacher_answers
    assert "qa_retained" not in alone and alone["kind"] == "hf"


def test_config_needs_text_or_qa(tiny_bundle: Path) -> None:
    with pytest.raises(ExportError, match="text file, a QA set"):
        evaluate.run(evaluate.EvaluateConfig(), tiny_bundle)
    with pytest.raises(ValueError, match="qa_max_tokens"):
        evaluate.EvaluateConfig(qa=QA_SET, qa_max_tokens=0)


def test_report_has_the_qa_section() -> None:
    teacher = _rows([(True, True), (False, True)], ["a", "b"])
    model = _rows([(True, True), (False, False)], ["a", "x"])
    base = {"parameters": 1e6, "size_bytes": 2**20, "perplexity": 2.0, "kind": "bundle", "text": {}}
    base["config"] = {"qa_max_tokens": 32}
    evals = {
        "load": {**base, "qa_file": "f.jsonl", **qa.summary(teacher)},
        "bundle": {**base, "qa_file": "f.jsonl", **qa.summary(model, teacher)},
    }
    md = report.markdown({"name": "n", "stages": [], "evaluations": evals}, report.ReportConfig())
    assert "## Knowledge (QA)" in md
    assert "| load: the teacher | 2/2 | 1 | — | — | — | — |" in md
    assert "| bundle | 1/2 | 1 | 2 | 50.0% | 100.0% | 50.0% |" in md
    assert "| d | 1 | 1 | 1 | 1 |" in md  # per category, the last model


def _qa_recipe(
    tiny_hf: Path, tmp_path: Path, teacher_answers: list[str], name: str, stage_evals: bool
) -> Any:
    """A tiny recipe whose [evaluate] asks a QA set the tiny teacher answers correctly."""
    from export import recipe as recipe_mod
    from export.load import LoadConfig
    from export.quantize import QuantizeConfig
    from export.to_onnx import ToOnnxConfig
    from tests.conftest import TRAIN_TEXT

    text = tmp_path / "t.txt"
    text.write_text("\n".join(TRAIN_TEXT))
    accepted = [[next((w for w in a.split() if qa.normalise(w)), "zzz")] for a in teacher_answers]
    path = _qa_file(tmp_path / "qa.jsonl", accepted)
    return recipe_mod.Recipe(
        name=name,
        load=LoadConfig(model=str(tiny_hf)),
        to_onnx=ToOnnxConfig(graph="optimum", max_context=256),
        quantize=QuantizeConfig(mode="none"),
        evaluate=evaluate.EvaluateConfig(
            text=text, span=(0.0, 1.0), max_tokens=100, context=64, stride=64, speed=False, qa=path,
            qa_max_tokens=8,
        ),
        report=report.ReportConfig(chart=False, stage_evals=stage_evals),
    )  # fmt: skip


def test_recipe_stage_writes_qa_fields(tiny_hf: Path, tmp_path: Path, teacher_answers: list[str]) -> None:
    """[evaluate] qa = FILE: the loaded model's answers are the teacher's; the bundle's evaluation
    reports retention against them; report.json / report.md carry it."""
    from export import recipe as recipe_mod

    recipe = _qa_recipe(tiny_hf, tmp_path, teacher_answers, "tiny-qa", stage_evals=True)
    out = recipe_mod.run(recipe, tmp_path / "bundle")
    data = json.loads((out / "report.json").read_text())
    load_eval, bundle_eval = data["evaluations"]["load"], data["evaluations"]["bundle"]
    assert [r["answer"] for r in load_eval["qa_items"]] == teacher_answers
    assert "qa_retained" not in load_eval  # the teacher is not compared with itself
    assert bundle_eval["qa_same_answer"] == 1.0
    assert bundle_eval["qa_teacher_correct"] == load_eval["qa_correct"]
    assert "## Knowledge (QA)" in (out / "report.md").read_text()


def test_teacher_answers_are_one_cached_stage(
    tiny_hf: Path, tmp_path: Path, teacher_answers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the loaded model's evaluation (report.stage_evals false), the bundle's evaluation
    takes the teacher's answers from the qa-answers cache; another recipe over the same teacher
    and set reuses them (the teacher does not answer again)."""
    from export import recipe as recipe_mod
    from export.to_onnx import ToOnnxConfig

    recipe = _qa_recipe(tiny_hf, tmp_path, teacher_answers, "tiny-qa-cached", stage_evals=False)
    out = recipe_mod.run(recipe, tmp_path / "a")
    first = json.loads((out / "report.json").read_text())["evaluations"]["bundle"]
    assert [r["teacher_answer"] for r in first["qa_items"]] == teacher_answers
    assert first["qa_same_answer"] == 1.0

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("the teacher answered again")

    monkeypatch.setattr(qa, "answer_torch", never)
    other = recipe_mod.run(
        replace(recipe, to_onnx=ToOnnxConfig(graph="optimum", max_context=128)), tmp_path / "b"
    )
    again = json.loads((other / "report.json").read_text())["evaluations"]["bundle"]
    assert again["qa_teacher_correct"] == first["qa_teacher_correct"]


def test_eval_command_qa(
    tiny_hf: Path, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _qa_file(tmp_path / "qa.jsonl", [["Paris"], ["boards"], ["return"]])
    out = tmp_path / "r.json"
    assert main(["eval", "--bundle", str(tiny_bundle), "--qa", str(path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "QA " in printed and "/3 correct" in printed and "retained" not in printed
    res = json.loads(out.read_text())
    assert res["qa_questions"] == 3 and len(res["qa_items"]) == 3
    rc = main(["eval", "--bundle", str(tiny_bundle), "--qa", str(path), "--teacher", str(tiny_hf)])
    assert rc == 0 and "same answer 100.0%" in capsys.readouterr().out


def test_eval_command_needs_text_or_qa(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--bundle", str(tiny_bundle)]) != 0
    assert "--text FILE, --qa FILE" in capsys.readouterr().err


def test_teacher_answers_come_from_the_cache(
    tiny_hf: Path,
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    teacher_answers: list[str],
) -> None:
    """The teacher answers a QA set once: a second evaluation with the same weights (in another
    folder), the same questions (other accepted answers) and settings loads no teacher; other
    settings or other weights answer again."""

    monkeypatch.setenv("EDGE_LLM_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []
    real = qa.answer_torch

    def counted(model: object, hf_dir: Path, items: list[qa.Question], n: int) -> list[str]:
        calls.append(n)
        return real(model, hf_dir, items, n)

    monkeypatch.setattr(qa, "answer_torch", counted)
    first = _qa_file(tmp_path / "qa.jsonl", [["Paris"], ["boards"], ["return"]])
    cfg = evaluate.EvaluateConfig(qa=first, qa_max_tokens=8)
    res = evaluate.run(cfg, tiny_bundle, tiny_hf, progress=False)
    assert calls == [8] and [r["teacher_answer"] for r in res["qa_items"]] == teacher_answers

    copy = shutil.copytree(tiny_hf, tmp_path / "teacher-copy")
    load_model = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("teacher loaded on a cache hit"))
    rescored = _qa_file(tmp_path / "qa2.jsonl", [["zzz"], ["boards"], ["return"]])
    res = evaluate.run(replace(cfg, qa=rescored), tiny_bundle, copy, progress=False)
    assert calls == [8] and [r["teacher_answer"] for r in res["qa_items"]] == teacher_answers
    assert not res["qa_items"][0]["teacher_ok"]  # scored against the new accepted answers

    monkeypatch.setattr(evaluate, "load_model", load_model)
    evaluate.run(replace(cfg, qa_max_tokens=4), tiny_bundle, copy, progress=False)
    assert calls == [8, 4]  # other generation settings: answered again
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other weights (the last byte of the last tensor), the same folder
    weights.write_bytes(bytes(data))
    evaluate.run(cfg, tiny_bundle, copy, progress=False)
    assert calls == [8, 4, 8]


def test_a_damaged_answers_entry_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_LLM_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    items = [qa.Question(question="What is 2 + 2?", answers=("4",), category="arithmetic")]
    monkeypatch.setattr(qa, "answer_torch", lambda *_a: ["4"])
    assert qa.answers_cached(lambda: None, hf, items, 8) == ["4"]
    (folder,) = (p for p in (tmp_path / "cache" / "stages").glob("qa-answers-*") if p.is_dir())
    (folder / qa.ANSWERS).write_text("[not json")
    with pytest.raises(ExportError, match="cached QA answers are damaged"):
        qa.answers_cached(lambda: None, hf, items, 8)
