"""Knowledge check: does a model still answer short factual questions the teacher answers?

Perplexity on text missed a pruned student that had stopped answering simple questions (issue
16), so the evaluate stage also asks a fixed QA set (`configs/qa/general-v1.jsonl`: one JSON
object a line, `{"question", "answers": [accepted, ...], "category"}`) and scores the answers.

How a question is asked: as one user turn through the model's own chat template (the bundle's,
or the HF tokenizer's for an HF folder, which renders the same ids), greedy, at most
`max_new_tokens` (32) new tokens, stopping at the first newline or end of turn. The bundle side
runs through `edge_llm.engine` (no torch); HF folders (the teacher, pruned / distilled models)
run the same greedy loop in torch.

How an answer is scored (`match`), against each accepted answer, on the answer's *first
sentence* (text up to the first `.`/`!`/`?` followed by a space or the end; a leading sentence
of at most two words such as "Sure!" does not count and the window extends to the next one):
- exact: the accepted answer appears verbatim (case-sensitive) as whole words in that window;
- normalised: both sides lower-cased, punctuation dropped, the articles a/an/the dropped and
  number words written as digits ("twenty-five" -> 25, "a hundred" -> 100); then the accepted
  answer's words must appear as a contiguous run of the window's words.
A question counts as correct when any accepted answer matches. A rambling answer that names
several candidates ("red, blue or green") can match by luck; the set avoids yes/no questions.

Retention (`summary`): of the questions the teacher answers correctly (normalised; exact for the
exact figure), the fraction the model also answers correctly. Questions the teacher misses say
nothing about what compression lost, so they are left out of it; the absolute accuracy over all
questions is reported too.

Answers from torch are cached (`answers_cached`: stage folders `qa-answers-<key>` in the export
cache): the teacher answering 125 questions costs minutes per export on a busy 2-core machine,
and the same teacher is asked the same questions by every export and `edge-llm eval --teacher`.
The key is the model folder's content (every file's sha256: the same weights and tokenizer under
any path), the questions' text (accepted answers only change the scoring, which always reruns),
`max_new_tokens`, and `ANSWERING`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_llm.bundle import sha256_file
from edge_llm.errors import ExportError
from export.cache import cached_stage, stable_key

log = logging.getLogger(__name__)
FIELDS = ("question", "answers", "category")


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    category: str


def load(path: Path) -> list[Question]:
    """The QA set in `path` (JSON lines); a bad line fails with its number and what is wrong."""
    items: list[Question] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ExportError(f"qa: cannot read {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise ExportError(f"{where}: expected an object with {', '.join(FIELDS)}")
        unknown = sorted(set(raw) - set(FIELDS))
        missing = [k for k in FIELDS if k not in raw]
        if unknown or missing:
            raise ExportError(f"{where}: unknown keys {unknown}, missing keys {missing}")
        q, answers, category = raw["question"], raw["answers"], raw["category"]
        if not isinstance(q, str) or not q.strip() or not isinstance(category, str):
            raise ExportError(f"{where}: question and category must be strings (question non-empty)")
        if not isinstance(answers, list) or not answers:
            raise ExportError(f"{where}: answers must be a non-empty list of strings")
        if not all(isinstance(a, str) and normalise(a) for a in answers):
            raise ExportError(f"{where}: every accepted answer must be a string with a word in it")
        items.append(Question(q.strip(), tuple(answers), category))
    if not items:
        raise ExportError(f"qa: {path} holds no questions")
    return items


# ----------------------------------------------------------------------------------- scoring

ARTICLES = frozenset({"a", "an", "the"})
_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
_UNITS += "fifteen sixteen seventeen eighteen nineteen"
UNITS = {w: i for i, w in enumerate(_UNITS.split())}
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety"
TENS = {w: 10 * i for i, w in enumerate(_TENS.split(), 2)}
SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
# A decimal number, or a run of letters/digits ("h2o"): punctuation never makes a word.
WORD = re.compile(r"\d+(?:\.\d+)?|[^\W_]+")
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def normalise(text: str) -> list[str]:
    """Words of `text`: lower-case, no punctuation, no articles, number words as digits."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())  # 1,000 -> 1000
    words = [w for w in WORD.findall(text.replace("-", " ")) if w not in ARTICLES]
    return _numbers(words)


def _numbers(words: list[str]) -> list[str]:
    """Runs of number words replaced by their value ("one hundred and five" -> "105")."""
    out: list[str] = []
    i = 0
    while i < len(words):
        j, total, current = i, 0, 0
        while j < len(words):
            w = words[j]
            if w in UNITS:
                current += UNITS[w]
            elif w in TENS:
                current += TENS[w]
            elif w == "hundred":
                current = max(current, 1) * 100
            elif w in SCALES:
                total, current = total + max(current, 1) * SCALES[w], 0
            elif w == "and" and j > i and j + 1 < len(words) and words[j - 1] in SCALES:
                pass  # "one hundred and five": "and" only inside a number, after a scale word
            else:
                break
            j += 1
        if j == i:
            out.append(words[i])
            i += 1
        else:
            out.append(str(total + current))
            i = j
    return out


def first_sentence(text: str) -> str:
    """The window an answer is scored on (see the module docstring)."""
    text = text.strip()
    start = 0
    for m in SENTENCE_END.finditer(text):
        if len(text[start : m.end()].split()) > 2:
            return text[: m.end()]
        # a short opener ("Sure!", "Of course.") does not count: keep going
    return text


# Words that say what kind of question it is, not what it is about.
_QUESTION_WORDS = "what whats which who whom how many much is are was were do does did of in on to for "
QUESTION_WORDS = frozenset((_QUESTION_WORDS + "by it its s there called").split())


def topic(text: str) -> frozenset[str]:
    """The words of a question that name what it asks about (`normalise`d, question words out)."""
    return frozenset(w for w in normalise(text) if w not in QUESTION_WORDS)


def unlike(items: Sequence[Question], overlap: float = 0.75) -> Callable[[str], bool]:
    """A test that is False for text asking one of `items` again: all of an item's topic words
    in it, or topic words shared at Jaccard >= `overlap`. Training data that must not hold the
    evaluation questions (export/distill.py) is filtered with it; it catches copies and close
    rewordings, not paraphrases with other words."""
    topics = [t for t in (topic(q.question) for q in items) if t]

    def ok(text: str) -> bool:
        words = topic(text)
        return not any(t <= words or len(t & words) / len(t | words) >= overlap for t in topics)

    return ok


def _contains(words: Sequence[str], part: Sequence[str]) -> bool:
    n = len(part)
    return n > 0 and any(list(words[i : i + n]) == list(part) for i in range(len(words) - n + 1))


def match(answer: str, accepted: Sequence[str]) -> tuple[bool, bool]:
    """(exact, normalised): whether any accepted answer is in the answer's first sentence."""
    window = first_sentence(answer)
    words = normalise(window)
    exact = any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", window) for a in accepted)
    normal = any(_contains(words, normalise(a)) for a in accepted)
    return bool(exact), normal or bool(exact)


def scored(items: Sequence[Question], answers: Sequence[str]) -> list[dict[str, Any]]:
    """One row per question: the answer and whether it matches (exact / normalised)."""
    rows = []
    for q, a in zip(items, answers, strict=True):
        exact, normal = match(a, q.answers)
        rows.append(
            {"question": q.question, "category": q.category, "answer": a, "exact": exact, "ok": normal}
        )
    return rows


def _retained(model: Sequence[dict], teacher: Sequence[dict], key: str) -> tuple[int, int]:
    """(questions the teacher gets right by `key`, of those the ones the model gets right too)."""
    known = [i for i, t in enumerate(teacher) if t[key]]
    return len(known), sum(1 for i in known if model[i][key])


def summary(rows: Sequence[dict], teacher_rows: Sequence[dict] | None = None) -> dict[str, Any]:
    """The qa_* result fields: absolute accuracy and, with the teacher's rows for the same
    questions, retention (None when the teacher answers none right) and identical answers."""
    n = len(rows)
    out: dict[str, Any] = {
        "qa_questions": n,
        "qa_correct": sum(r["ok"] for r in rows),
        "qa_correct_exact": sum(r["exact"] for r in rows),
    }
    out["qa_accuracy"] = out["qa_correct"] / n if n else None
    out["qa_accuracy_exact"] = out["qa_correct_exact"] / n if n else None
    if teacher_rows is not None:
        if [t["question"] for t in teacher_rows] != [r["question"] for r in rows]:
            raise ExportError("qa: the teacher's answers are for other questions than the model's")
        pairs = list(zip(rows, teacher_rows, strict=True))
        known, kept = _retained(rows, teacher_rows, "ok")
        known_x, kept_x = _retained(rows, teacher_rows, "exact")
        out |= {
            "qa_teacher_correct": known,
            "qa_teacher_correct_exact": known_x,
            "qa_retained_count": kept,
            "qa_retained": kept / known if known else None,
            "qa_retained_exact": kept_x / known_x if known_x else None,
            "qa_same_answer": sum(r["answer"] == t["answer"] for r, t in pairs) / n,
        }
    cats: dict[str, dict[str, int]] = {}
    for i, r in enumerate(rows):
        c = cats.setdefault(r["category"], {"questions": 0, "correct": 0})
        c["questions"] += 1
        c["correct"] += r["ok"]
        if teacher_rows is not None:
            c["teacher_correct"] = c.get("teacher_correct", 0) + teacher_rows[i]["ok"]
            c["retained"] = c.get("retained", 0) + (teacher_rows[i]["ok"] and r["ok"])
    out["qa_by_category"] = cats
    return out


def with_teacher(rows: list[dict], teacher_rows: list[dict]) -> list[dict]:
    """The model's rows with the teacher's answer and marks beside each (for report.json)."""
    return [
        {**r, "teacher_answer": t["answer"], "teacher_exact": t["exact"], "teacher_ok": t["ok"]}
        for r, t in zip(rows, teacher_rows, strict=True)
    ]


def teacher_rows(rows: Sequence[dict]) -> list[dict] | None:
    """The teacher's rows recorded beside a model's (`with_teacher`), or None."""
    if not rows or "teacher_answer" not in rows[0]:
        return None
    return [
        {"question": r["question"], "category": r["category"], "answer": r["teacher_answer"],
         "exact": r["teacher_exact"], "ok": r["teacher_ok"]}
        for r in rows
    ]  # fmt: skip


# ---------------------------------------------------------------------------------- answering


def messages(q: Question) -> list[dict[str, str]]:
    return [{"role": "user", "content": q.question}]


def answer_bundle(engine: Any, items: Sequence[Question], max_new_tokens: int) -> list[str]:
    """Greedy answers through the runtime (`edge_llm.engine`): chat template, stop at newline."""
    from edge_llm.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, stop=("\n",))
    return [engine.complete(engine.encode_request(messages=messages(q)), params).text for q in items]


def answer_torch(
    model: Any, hf_dir: Path, items: Sequence[Question], max_new_tokens: int, batch: int = 16
) -> list[str]:
    """The same greedy answers from an in-memory HF model (the teacher, a pruned model): the HF
    tokenizer's chat template, greedy with a KV cache, stop at end of turn or newline. Questions
    go `batch` at a time (left-padded): one question at a time took 19-52 min for 125 questions
    on a loaded 2-core host, where torch's threads thrash; a batch pays that per step once."""
    from export.hf import hf_tokenizer, special_ids

    tok = hf_tokenizer(hf_dir)
    stop = set(special_ids(Path(hf_dir))[1])
    prompts = [list(tok.apply_chat_template(messages(q), add_generation_prompt=True)) for q in items]
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        out += _answer_batch(model, tok, stop, prompts[start : start + batch], max_new_tokens)
    return out


def _answer_batch(
    model: Any, tok: Any, stop: set[int], prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy answers to left-padded prompts in one KV cache (`teacher.greedy_batch`); a row stops
    at a stop id or once its text holds a newline, the batch when every row has."""
    from export.teacher import greedy_batch

    rows = greedy_batch(
        model, prompts, max_new_tokens, stop, lambda new: "\n" in tok.decode(new, skip_special_tokens=True)
    )
    texts = [tok.decode(new, skip_special_tokens=True) for new, _ in rows]
    # As the runtime's stream decoder: an incomplete character at the very end is dropped.
    return [t.split("\n", 1)[0] if "\n" in t else t.rstrip("\ufffd") for t in texts]


# How `answer_torch` answers (template, greedy fp32 loop, stops, decoding): part of the cache key,
# so answers written by an older loop are never reused. Change it with any change to that loop.
ANSWERING = "torch-greedy-fp32-batched-v2"
ANSWERS = "answers.json"
# Folder digests computed in this process, by folder and every file's (name, size, mtime): an
# export asks for the teacher's several times, and hashing SmolLM2's 540 MB takes seconds.
_DIGESTS: dict[tuple[str, tuple], str] = {}


def model_digest(hf_dir: Path) -> str:
    """sha256 over the names and contents of every file in an HF folder: the model's identity."""
    root = Path(hf_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stats = tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo = (str(root.resolve()), stats)
    if memo not in _DIGESTS:
        lines = "".join(f"{name}\0{sha256_file(root / name)}\n" for name, _, _ in stats)
        _DIGESTS[memo] = stable_key(lines)
    return _DIGESTS[memo]


def answers_cached(
    model: Callable[[], Any], hf_dir: Path, items: Sequence[Question], max_new_tokens: int
) -> list[str]:
    """`answer_torch`'s answers, from the export cache when this model (by content) has answered
    these questions with these settings before; `model()` gives the loaded model on a miss only."""
    # torch / transformers versions too: answers hang on near ties that another kernel may break
    # the other way, so an upgrade answers again.
    versions = [importlib.metadata.version(m) for m in ("torch", "transformers")]
    key = stable_key(model_digest(hf_dir), [q.question for q in items], max_new_tokens, ANSWERING, versions)

    def build(out: Path) -> None:
        answers = answer_torch(model(), hf_dir, items, max_new_tokens)
        tmp = out / (ANSWERS + ".tmp")
        tmp.write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, out / ANSWERS)

    folder, hit = cached_stage("qa-answers", key, build)
    damaged = ExportError(f"{folder}: cached QA answers are damaged (remove the folder to recompute)")
    try:
        answers = json.loads((folder / ANSWERS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise damaged from None
    if not isinstance(answers, list) or len(answers) != len(items):
        raise damaged
    if hit:
        log.info("qa: %s's answers to %d questions from the cache (%s)", hf_dir, len(items), folder)
    return answers
