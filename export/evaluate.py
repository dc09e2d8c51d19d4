"""Stage 6, evaluate: a model (bundle folder or HF folder) + a text file in, quality/size/speed facts out.

What it measures (`EvaluateConfig`):
- perplexity on a span of a text file, sliding window: windows of `context` tokens every
  `stride` tokens, each token scored once, by the window that sees most left context (the
  Hugging Face "perplexity of fixed-length models" recipe). With stride == context the windows
  do not overlap and the first token of each window is not scored. Context, stride, span and the
  number of scored tokens are recorded with the result.
- against a teacher (the unpruned fp32 HF model, run with torch): mean KL(teacher ‖ model) per
  token and top-1 agreement (argmax equal), on the same windows; and the teacher's perplexity.
- chat (`chat_tokens`, with a teacher): the same KL / top-1 agreement on the answers of chat
  turns the teacher writes itself (`teacher.chats`, seeded with `chat_seed`, which the
  recipe keeps apart from distillation's), and the model's perplexity on those answers. Text
  perplexity alone missed a pruned student that had stopped answering chat prompts.
- knowledge (`qa`, a JSON-lines QA set: `export/qa.py`): greedy chat answers to short factual
  questions, scored by a normalised match; with a teacher, the fraction of the questions the
  teacher answers correctly that the model still answers (retention). Perplexity stayed near the
  teacher's for a pruned student that no longer answered simple questions.
- size on disk, parameter count.
- speed (bundles only, through `edge_llm.engine`): time to first token for a `speed_prompt`-token
  prompt and greedy decode tokens/s over `speed_tokens` tokens, best of `speed_runs` (the CPU is
  shared: the best run is the least disturbed one).

Text spans are fractions of the file's characters, so a recipe can hold out text for evaluation
that distillation never sees (`export/distill.py` trains on a disjoint span).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_llm.bundle import sha256_file
from edge_llm.errors import ExportError
from export import hf, qa, teacher, trim_vocab
from export.cache import stable_key
from export.stage import Artifact, Stage
from export.teacher import Logits, load_model, torch_logits
from export.text import check_span, first_tokens, read_span, resolve_text

log = logging.getLogger(__name__)
# Rows of a window's logits turned into log-probabilities at a time: float64 copies of a whole
# 512 x 49,152 window were ~200 MB each, four of them alive at once.
ROWS = 64


@dataclass(frozen=True)
class EvaluateConfig:
    text: Path | None = None  # required in a recipe; relative: cwd, then the checkout root (export/text.py)
    span: tuple[float, float] = (0.0, 0.1)  # fraction of the file's characters evaluated
    max_tokens: int = 8192  # the first max_tokens tokens of the span
    context: int = 512
    stride: int = 512
    teacher: bool = True  # KL / top-1 agreement against the unpruned model
    chat_tokens: int = 0  # teacher-written chat turns to compare on (0: none; needs teacher)
    chat_seed: int = 1
    chat_max_answer: int = 160
    speed: bool = True
    speed_prompt: int = 128
    speed_tokens: int = 64
    speed_runs: int = 3
    threads: int = 0  # 0: one per core
    provider: str = "cpu"  # execution provider of the bundle's session (edge_llm.providers names)
    qa: Path | None = None  # QA set (JSON lines, export/qa.py); resolved like `text`
    qa_max_tokens: int = 32  # new tokens per answer (it also stops at a newline)

    def __post_init__(self) -> None:
        check_span(self.span, "evaluate.span")
        if self.context < 2 or self.stride < 1 or self.stride > self.context:
            raise ValueError("evaluate: need context >= 2 and 1 <= stride <= context")
        if self.chat_tokens < 0 or self.chat_max_answer < 8:
            raise ValueError("evaluate: need chat_tokens >= 0 and chat_max_answer >= 8")
        if self.max_tokens < 2:
            raise ValueError("evaluate.max_tokens must be >= 2")
        if self.speed_prompt < 1 or self.speed_tokens < 2 or self.speed_runs < 1:
            raise ValueError("evaluate: speed_prompt >= 1, speed_tokens >= 2, speed_runs >= 1")
        if not 1 <= self.qa_max_tokens <= 256:
            raise ValueError("evaluate.qa_max_tokens must be in [1, 256]")


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over n tokens; every token 1..n-1 scored once."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == n:
            break


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) if x.dtype != np.float64 else x
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _sums(
    window: np.ndarray, start: int, model: Logits, teacher: Logits | None
) -> tuple[float, float, float, int]:
    """Over the targets window[start:] (each predicted by the position before it): the model's
    NLL and, with a teacher, the teacher's NLL, KL(teacher ‖ model) and argmax agreements."""
    targets = window[start:]
    logits = model(window)[start - 1 : -1]
    t_logits = None if teacher is None else teacher(window)[start - 1 : -1]
    nll = t_nll = kl = 0.0
    agree = 0
    for a in range(0, len(targets), ROWS):  # float64 log-probabilities ROWS positions at a time
        rows, want = np.arange(min(ROWS, len(targets) - a)), targets[a : a + ROWS]
        lp = log_softmax(logits[a : a + ROWS])
        nll -= float(lp[rows, want].sum())
        if t_logits is None:
            continue
        tp = log_softmax(t_logits[a : a + ROWS])
        t_nll -= float(tp[rows, want].sum())
        kl += float((np.exp(tp) * (tp - lp)).sum())
        agree += int((tp.argmax(-1) == lp.argmax(-1)).sum())
    return nll, t_nll, kl, agree


def score(
    ids: np.ndarray,
    model: Logits,
    context: int,
    stride: int,
    teacher: Logits | None = None,
    progress: bool = False,
    label: str = "evaluate",
    nbytes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Perplexity of `model` on token ids (and KL / agreement / perplexity of `teacher`);
    `label` names the progress bar. `nbytes` (UTF-8 bytes of each token id) adds bits per byte:
    the figure that compares models whose tokenizers differ (a trimmed vocabulary)."""
    nll = t_nll = kl = 0.0
    agree = count = scored_bytes = 0
    spans = list(windows(len(ids), context, stride))
    bar = _bar(len(spans), label, progress)
    for begin, end, first in spans:
        sums = _sums(ids[begin:end], first - begin, model, teacher)
        nll, t_nll, kl, agree = nll + sums[0], t_nll + sums[1], kl + sums[2], agree + sums[3]
        count += end - first
        scored_bytes += 0 if nbytes is None else int(nbytes[ids[first:end]].sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    if bar is not None:
        bar.close()
    out: dict[str, Any] = {"perplexity": math.exp(nll / count), "nll": nll / count, "scored_tokens": count}
    if scored_bytes:
        out |= {"bits_per_byte": nll / scored_bytes / math.log(2), "scored_bytes": scored_bytes}
    if teacher is not None:
        out |= {
            "teacher_perplexity": math.exp(t_nll / count),
            "kl_to_teacher": kl / count,
            "top1_agreement": agree / count,
        }
        if scored_bytes:
            out["teacher_bits_per_byte"] = t_nll / scored_bytes / math.log(2)
    return out


def restricted(teacher: Logits, ids: np.ndarray) -> Logits:
    """The teacher over a trimmed vocabulary: it reads the student's ids mapped to its own and
    scores only the student's tokens (log-softmax over them renormalises): the distribution the
    student can match, compared token for token on the student's tokenization."""
    return lambda x: teacher(ids[x])[:, ids]


def text_scores(
    config: EvaluateConfig,
    model_dir: Path,
    encode: Callable[[str], list[int]],
    tokenizer_file: Path,
    logits: Logits,
    t_logits: Logits | None,
    teacher_dir: Path | None,
    chats: list[tuple[list[int], int]] | None,
    progress: bool,
    label: str,
    max_len: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """Perplexity (and bits per byte) on the text span, with the teacher's KL / top-1 beside it,
    and on the teacher's `chats` (`score_chats`, the first `max_len` tokens of each); and the
    span's ids (the speed test's prompt).

    For a trimmed vocabulary (the teacher id of each model id in the model's folder) KL and top-1
    are against the restricted teacher (`restricted`) on the model's tokens, the chats are
    re-encoded by the model's tokenizer, and the teacher's perplexity / bits per byte come from a
    second pass over its own tokenization of the same text: the per-token perplexities of two
    tokenizers do not compare, bits per byte do."""
    vmap = trim_vocab.teacher_ids(model_dir)
    ids, where = tokenize_span(config, encode)
    nbytes = trim_vocab.token_bytes(tokenizer_file)
    teacher = t_logits if vmap is None or t_logits is None else restricted(t_logits, vmap)
    out = {"text": where} | score(
        ids, logits, config.context, config.stride, teacher, progress, label, nbytes
    )
    if vmap is not None and t_logits is not None and teacher_dir is not None:
        from tokenizers import Tokenizer

        t_tok = Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))
        t_ids, _ = tokenize_span(config, lambda s: t_tok.encode(s, add_special_tokens=False).ids)
        t_bytes = trim_vocab.token_bytes(teacher_dir / "tokenizer.json")
        own = score(t_ids, t_logits, config.context, config.stride, None, progress, "teacher", t_bytes)
        out |= {
            "teacher_perplexity_restricted": out.pop("teacher_perplexity"),
            "teacher_perplexity": own["perplexity"],
            "teacher_scored_tokens": own["scored_tokens"],
            "teacher_bits_per_byte": own.get("bits_per_byte"),
            "vocab_trimmed": {
                "vocab": len(vmap),
                "teacher_vocab": t_tok.get_vocab_size(with_added_tokens=True),
            },
        }
        if chats:
            chats = student_chats(chats, t_tok, encode)
    if chats and teacher is not None:
        out |= score_chats(chats, logits, teacher, max_len)
    return out, ids


def student_chats(
    chats: list[tuple[list[int], int]], t_tok: Any, encode: Callable[[str], list[int]]
) -> list[tuple[list[int], int]]:
    """Teacher-written chats (teacher ids) re-encoded by a trimmed model's tokenizer, prompt and
    answer each on its own so the answer still starts where the prompt ends."""
    out = []
    for ids, n in chats:
        prompt = trim_vocab.retokenize(ids[:n], t_tok, encode)
        out.append((prompt + trim_vocab.retokenize(ids[n:], t_tok, encode), len(prompt)))
    return out


def score_chats(
    chats: list[tuple[list[int], int]], model: Logits, teacher: Logits, max_len: int = 0
) -> dict[str, Any]:
    """KL(teacher ‖ model), top-1 agreement and perplexities on the answer tokens of each chat
    (the first `max_len` tokens of each: a model's context window; 0 = whole chats)."""
    nll = t_nll = kl = 0.0
    agree = count = turns = 0
    for ids, prompt_len in chats:
        window = np.asarray(ids[:max_len] if max_len else ids, dtype=np.int64)
        if len(window) <= prompt_len:
            continue
        turns += 1
        sums = _sums(window, prompt_len, model, teacher)
        nll, t_nll, kl, agree = nll + sums[0], t_nll + sums[1], kl + sums[2], agree + sums[3]
        count += len(window) - prompt_len
    if not count:
        raise ExportError("evaluate: the teacher's chat turns have no answer tokens to score")
    return {
        "chat_turns": turns,
        "chat_scored_tokens": count,
        "chat_kl_to_teacher": kl / count,
        "chat_top1_agreement": agree / count,
        "chat_perplexity": math.exp(nll / count),
        "teacher_chat_perplexity": math.exp(t_nll / count),
    }


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="win", dynamic_ncols=True)


def bundle_logits(engine: Any) -> Logits:
    return engine.score


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def tokenize_span(config: EvaluateConfig, encode: Callable[[str], list[int]]) -> tuple[np.ndarray, dict]:
    text, where = read_span(config.text, config.span, "evaluate.text")
    ids = np.asarray(first_tokens(text, encode, config.max_tokens), dtype=np.int64)
    if len(ids) < 2:
        raise ExportError(f"{where['file']}: span {config.span} has fewer than 2 tokens")
    return ids, {**where, "tokens": len(ids), "context": config.context, "stride": config.stride}


def measure_speed(engine: Any, ids: np.ndarray, config: EvaluateConfig) -> dict[str, Any]:
    """Best-of-N time to first token and decode tokens/s (greedy, EOS ignored)."""
    from edge_llm.sampling import SamplingParams

    prompt = [int(i) for i in ids[: config.speed_prompt]]
    params = SamplingParams(max_tokens=config.speed_tokens, ignore_eos=True)
    engine.complete(prompt[:8], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    runs = [engine.complete(prompt, params).usage for _ in range(config.speed_runs)]
    return {
        "ttft_s": min(u.ttft_s for u in runs),
        "decode_tok_s": max(u.decode_tok_s for u in runs),
        "decode_tok_s_runs": [round(u.decode_tok_s, 2) for u in runs],
        "speed_prompt_tokens": len(prompt),
        "speed_new_tokens": config.speed_tokens,
        "threads": config.threads or "all cores",
    }


def run(
    config: EvaluateConfig,
    model_dir: Path,
    teacher_hf_dir: Path | None = None,
    progress: bool = True,
    label: str = "",
    teacher_qa: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate a bundle folder (bundle.json) or an HF folder (config.json) and return the facts.
    `label` names the progress bar (default: the folder's name). `teacher_qa`: the teacher's
    scored QA answers if already known (the recipe's evaluation of the loaded model); else the
    teacher answers them here. Without `config.text` only the QA set is scored."""
    model_dir = Path(model_dir)
    label = label or f"evaluate {model_dir.name}"
    if config.text is None and config.qa is None:  # a recipe names its text (recipe.py checks)
        raise ExportError("evaluate: give a text file, a QA set (qa), or both")
    t0 = time.perf_counter()
    t_logits = chats = teacher_model = None
    questions = qa.load(resolve_text(config.qa, "evaluate.qa")) if config.qa is not None else None
    teacher_dir = teacher_hf_dir if config.teacher else None
    # The teacher runs here for text (logits, chats); its QA answers come from the cache or, on a
    # miss, from this model or one loaded then.
    if teacher_dir is not None and config.text is not None:
        t_logits, teacher_model = torch_logits(teacher_dir, config.threads)
        if config.chat_tokens:
            chats = teacher.chats(
                teacher_model,
                teacher_dir,
                config.chat_tokens,
                config.chat_max_answer,
                config.chat_seed,
                "cpu",
            )
    result: dict[str, Any] = {"model": str(model_dir), "config": jsonable(asdict(config))}
    if (model_dir / "bundle.json").is_file():
        from edge_llm.engine import Engine
        from edge_llm.providers import ProviderSpec
        from edge_llm.runner import RunnerOptions

        options = RunnerOptions(providers=(ProviderSpec(config.provider),), threads=config.threads)
        engine = Engine.load(model_dir, options)
        result |= {
            "kind": "bundle",
            "provider": engine.runner.provider,
            "parameters": engine.bundle.architecture.parameters,
            "size_bytes": folder_size(model_dir),
            "quantization": engine.bundle.quantization.get("mode", engine.bundle.quantization.get("method")),
        }
        if config.text is not None:
            encode, tok_file = engine.tokenizer.encode, engine.bundle.tokenizer_path
            scores, ids = text_scores(
                config, model_dir, encode, tok_file, bundle_logits(engine), t_logits, teacher_dir, chats,
                progress, label, engine.max_context,
            )  # fmt: skip
            result |= scores
            if config.speed:
                result |= measure_speed(engine, ids, config)
        if questions is not None:
            rows = qa.scored(questions, qa.answer_bundle(engine, questions, config.qa_max_tokens))
    elif (model_dir / "config.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        logits, model = torch_logits(model_dir, config.threads)
        result |= {
            "kind": "hf",
            "parameters": hf.parameters(model_dir),
            "size_bytes": hf.weights_bytes(model_dir),
        }
        if config.text is not None:
            encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
            scores, _ = text_scores(
                config, model_dir, encode, model_dir / "tokenizer.json", logits, t_logits, teacher_dir,
                chats, progress, label,
            )  # fmt: skip
            result |= scores
        if questions is not None:
            answers = qa.answers_cached(lambda: model, model_dir, questions, config.qa_max_tokens)
            rows = qa.scored(questions, answers)
    else:
        raise ExportError(f"{model_dir}: neither a bundle (bundle.json) nor an HF folder (config.json)")
    if questions is not None:
        if teacher_qa is None and teacher_dir is not None:
            teacher_qa = teacher_answers(config, teacher_dir, teacher_model)
        # The teacher's answers when known: computed here (config.teacher) or handed in, which
        # costs nothing, so retention is reported even without the KL pass.
        result |= qa_result(config, rows, teacher_qa)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def qa_result(config: EvaluateConfig, rows: list[dict], teacher_rows: list[dict] | None) -> dict[str, Any]:
    """The qa_* fields of a result: the summary and every answer (with the teacher's beside it)."""
    items = rows if teacher_rows is None else qa.with_teacher(rows, teacher_rows)
    return {"qa_file": str(config.qa), **qa.summary(rows, teacher_rows), "qa_items": items}


def jsonable(x: Any) -> Any:
    """Paths as strings, tuples as lists, recursively: what json.dumps takes."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return str(x) if isinstance(x, Path) else x


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=2) + "\n")


def headline(result: dict[str, Any]) -> str:
    """One line for the terminal."""
    parts = []
    if "perplexity" in result:
        parts.append(f"perplexity {result['perplexity']:.3f} ({result['scored_tokens']} tokens")
        parts[0] += f", ctx {result['text']['context']}, stride {result['text']['stride']})"
    if "kl_to_teacher" in result:
        parts.append(f"KL {result['kl_to_teacher']:.4f}, top-1 {100 * result['top1_agreement']:.1f}%")
        parts.append(f"teacher ppl {result['teacher_perplexity']:.3f}")
    if "chat_kl_to_teacher" in result:
        parts.append(
            f"chat answers: KL {result['chat_kl_to_teacher']:.4f}, "
            f"top-1 {100 * result['chat_top1_agreement']:.1f}% ({result['chat_scored_tokens']} tokens)"
        )
    if "qa_questions" in result:
        parts.append(qa_line(result))
    parts.append(f"{result['parameters'] / 1e6:.1f}M params, {result['size_bytes'] / 2**20:.1f} MiB")
    if "decode_tok_s" in result:
        parts.append(f"decode {result['decode_tok_s']:.1f} tok/s, TTFT {1000 * result['ttft_s']:.0f} ms")
    return "; ".join(parts)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def qa_line(r: dict[str, Any]) -> str:
    """The QA figures in words: accuracy, and retention when the teacher's answers are known."""
    line = f"QA {r['qa_correct']}/{r['qa_questions']} correct ({r['qa_correct_exact']} exact)"
    if "qa_retained" in r:
        line += (
            f", teacher {r['qa_teacher_correct']} ({r['qa_teacher_correct_exact']} exact), retained "
            f"{_pct(r['qa_retained'])} ({_pct(r['qa_retained_exact'])} exact), "
            f"same answer {_pct(r['qa_same_answer'])}"
        )
    return line


# --------------------------------------------------------------------------- as a recipe stage

RESULT = "result.json"
BRIEF = ("perplexity", "kl_to_teacher", "top1_agreement", "parameters", "size_bytes")
BRIEF += ("decode_tok_s", "ttft_s", "qa_accuracy", "qa_retained")


@dataclass(frozen=True)
class EvaluateTask:
    """Evaluate the artifact's newest model (its bundle once written, else its HF folder)."""

    config: EvaluateConfig
    teacher: Path | None = None  # compared against (None: no KL / top-1)


def key(task: EvaluateTask, art: Artifact) -> str:
    # The QA set's content, not only its path: an edited set must not reuse old answers.
    digest = "" if task.config.qa is None else sha256_file(resolve_text(task.config.qa, "evaluate.qa"))
    return stable_key(art.key, task.config, str(task.teacher), digest)


def loaded_qa(art: Artifact) -> list[dict[str, Any]] | None:
    """The teacher's scored QA answers from the recipe's evaluation of the loaded model (the
    teacher itself, same config), so later evaluations need not have the teacher answer again."""
    rows = art.evaluations.get("load", {}).get("qa_items")
    return None if rows is None or art.last == "load" else rows


def teacher_answers(config: EvaluateConfig, teacher_dir: Path, loaded: Any = None) -> list[dict[str, Any]]:
    """The teacher's scored answers to `config.qa`, from the export cache when this teacher (by
    content) answered the set before (`qa.answers_cached`), so every recipe over the same teacher
    and set shares them: answering 125 questions with the teacher in torch took 19 min on a loaded
    2-core host, more than the bundle's whole evaluation. On a miss the teacher answers: `loaded`
    (already in memory), else loaded here."""
    questions = qa.load(resolve_text(config.qa, "evaluate.qa"))
    answers = qa.answers_cached(
        lambda: loaded if loaded is not None else load_model(teacher_dir, "cpu", config.threads),
        teacher_dir,
        questions,
        config.qa_max_tokens,
    )
    return qa.scored(questions, answers)


def label(art: Artifact) -> str:
    """The progress bar's name: which model is being scored."""
    if art.last == "load":
        return "evaluate teacher (fp32, as loaded)"
    return "evaluate bundle" if art.bundle is not None else f"evaluate after {art.last}"


def build(task: EvaluateTask, art: Artifact, out: Path, progress: bool) -> None:
    model = art.bundle if art.bundle is not None else art.hf_dir
    known = loaded_qa(art)
    if known is None and task.config.teacher and task.teacher is not None and task.config.qa is not None:
        known = teacher_answers(task.config, task.teacher)
    res = run(task.config, model, task.teacher, progress, label(art), teacher_qa=known)
    save(res, out / RESULT)


def result(task: EvaluateTask, art: Artifact, folder: Path) -> Artifact:
    res = json.loads((folder / RESULT).read_text())
    if art.bundle is not None:  # a cached result may come from a run that wrote another folder
        res["model"] = str(art.bundle)
    teacher_rows = loaded_qa(art)
    if "qa_items" in res and "qa_retained" not in res and teacher_rows is not None:
        # Intermediate models are not compared with the teacher (report.stage_teacher), but
        # their retention costs nothing: the loaded model's answers are the teacher's.
        res |= qa_result(task.config, res["qa_items"], teacher_rows)
    facts = {k: res[k] for k in BRIEF if k in res}
    return replace(art, evaluations={**art.evaluations, art.last: res}, facts=facts)


STAGE = Stage("evaluate", build, result, key=key, chained=False)
