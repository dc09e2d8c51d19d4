"""Stage 3, distill: a teacher HF folder + a (pruned) student HF folder + text in, a trained student out.

The original model teaches the pruned one: loss = T^2 * KL(teacher_T ‖ student_T) on the logits
at temperature T, plus optionally a hidden-state loss (1 - cosine of the final hidden states)
and a hard-label cross-entropy. Training text is a span of a text file (default: WikiText-2
valid, characters 10%..100%, so the first 10% stays held out for `evaluate`) and/or text the
teacher generates itself: continuations of the text (`teacher_tokens`) and chat turns
(`chat_tokens`). Plain text alone keeps perplexity but loses the chat model: a pruned SmolLM2
distilled on WikiText only answered "What is the capital of France?" with its own system prompt.
Chat turns are written the Magpie way, with no dataset: the teacher gets its chat template up to
an empty user turn and writes the question itself, then answers it; the student learns the
teacher's distribution on the whole templated conversation.

Bounded time: a token budget (`tokens`: student tokens trained on, cycling the text when it is
shorter), micro-batches with gradient accumulation, and an optional wall-clock cap
(`max_minutes`, which makes the result depend on machine speed: recorded in the report). Uses
CUDA when present (`device = "auto"`). A progress bar shows the loss and tokens/s.

Faster steps on a CPU (both off by default): `teacher_topk` keeps the teacher's top-k targets per
row (export/distill_targets.py), so it runs once per row across epochs and reruns; `autocast`
runs the student's decoder in bf16 where the hardware has it (LM head and loss stay fp32).

Checkpoints: every `checkpoint_every` optimizer steps the student, optimizer, schedule and data
position go to `out_dir/checkpoint.pt` (written atomically); a rerun into the same folder — the
recipe keeps an interrupted stage's `.partial` folder — resumes from there with the same data
and order: what the teacher wrote is kept there too (`teacher_text.json`, `chats.json`). Out:
`out_dir` with the student (safetensors + config + tokenizer) and `distill.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from edge_llm.errors import ExportError
from export import distill_targets, evaluate, qa, trim_vocab
from export.hf import TOKENIZER_FILES
from export.stage import Artifact, Stage
from export.teacher import answers as teacher_answers
from export.teacher import chats as teacher_chats
from export.teacher import load_model, model_logits
from export.text import check_span, overlaps, read_span, resolve_text

log = logging.getLogger(__name__)
REPORT = "distill.json"
CHECKPOINT = "checkpoint.pt"
CHATS = "chats.json"  # the teacher-written conversations trained on (token ids)
QUESTIONS = "questions.json"  # the teacher's answers to the `questions` file (token ids)
TEACHER_TEXT = "teacher_text.json"  # the teacher's text continuations trained on (token ids)


@dataclass(frozen=True)
class DistillConfig:
    text: Path | None = None  # required; relative: cwd, then the checkout root (export/text.py)
    span: tuple[float, float] = (0.1, 1.0)  # fraction of the file trained on (eval text held out)
    teacher_tokens: int = 0  # extra training text sampled from the teacher (0: none)
    chat_tokens: int = 0  # chat turns (question + answer) the teacher writes itself (0: none)
    chat_max_answer: int = 160  # tokens per generated answer at most
    # QA-style turns: a file of user questions, one a line (# comments), that the teacher
    # answers (sampled as the chats); none of them may ask an `exclude_qa` question again.
    questions: Path | None = None
    # An evaluation QA set (export/qa.py) kept out of training: teacher-written chats asking one
    # of its questions again (qa.unlike) are not trained on, and a `questions` file that does is
    # refused. A small teacher's self-written questions include "What is the capital of France?".
    exclude_qa: Path | None = None
    tokens: int = 100_000  # token budget: student tokens trained on
    seq_len: int = 256
    batch: int = 4  # sequences per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.0
    temperature: float = 2.0
    kl_weight: float = 1.0
    hidden_weight: float = 0.0  # 1 - cos(final hidden states of student and teacher)
    ce_weight: float = 0.0  # cross-entropy on the text's next tokens
    freeze_embeddings: bool = True  # the tied embedding / lm_head stays the teacher's
    # Teacher targets computed once (export/distill_targets.py): > 0, the teacher's top-k
    # log-probs + tail mass per position, kept in the export cache; every later epoch and rerun
    # trains on them without the teacher. 0: the teacher runs on every micro-batch (full KL).
    teacher_topk: int = 0
    # The student's decoder layers in bf16 autocast (fp32 master weights, the LM head and loss in
    # fp32): "auto" where the hardware computes bf16 natively (CPU avx512_bf16 / AMX, CUDA).
    autocast: Literal["off", "bf16", "auto"] = "off"
    # Token counts at which the student is also saved to out_dir/at-<tokens> (a learning curve
    # of what only a finished model can show: QA answers, chat agreement).
    save_at: tuple[int, ...] = ()
    checkpoint_every: int = 20  # optimizer steps
    # Learning curve: every `eval_every` optimizer steps (0: never; also at the start and the
    # end) the student's perplexity on the held-out span, same windows as `evaluate`.
    eval_every: int = 0
    eval_span: tuple[float, float] = (0.0, 0.1)
    eval_tokens: int = 8192
    eval_context: int = 512
    max_minutes: float = 0.0  # wall-clock cap on training (0: none)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0

    def __post_init__(self) -> None:
        check_span(self.span, "distill.span")
        check_span(self.eval_span, "distill.eval_span")
        checks = [
            (self.tokens >= 1, "tokens must be >= 1"),
            (
                self.seq_len >= 2 and self.batch >= 1 and self.grad_accum >= 1,
                "seq_len >= 2, batch/grad_accum >= 1",
            ),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr > 0 and min_lr_ratio in [0, 1]"),
            (self.temperature > 0, "temperature must be > 0"),
            (min(self.kl_weight, self.hidden_weight, self.ce_weight) >= 0, "loss weights must be >= 0"),
            (self.kl_weight + self.hidden_weight + self.ce_weight > 0, "some loss weight must be > 0"),
            (self.checkpoint_every >= 1 and self.max_minutes >= 0, "checkpoint_every >= 1, max_minutes >= 0"),
            (
                min(self.teacher_tokens, self.chat_tokens, self.warmup_steps) >= 0,
                "teacher_tokens, chat_tokens, warmup_steps >= 0",
            ),
            (self.chat_max_answer >= 8, "chat_max_answer must be >= 8"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.teacher_topk >= 0, "teacher_topk must be >= 0"),
            (
                not (self.teacher_topk and self.hidden_weight),
                "teacher_topk keeps the teacher's logits only; hidden_weight needs its hidden states",
            ),
            (all(t >= 1 for t in self.save_at), "save_at token counts must be >= 1"),
            (self.eval_tokens >= 2 and self.eval_context >= 2, "eval_tokens, eval_context >= 2"),
            (
                not (self.eval_every and overlaps(self.span, self.eval_span)),
                f"eval_span {list(self.eval_span)} overlaps the training span {list(self.span)}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"distill: {msg}")

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.seq_len * self.batch * self.grad_accum)))


def pick_device(config: DistillConfig) -> str:
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("distill.device = 'cuda' but no CUDA device is available")
    return config.device


def bf16_native(device: str) -> bool:
    """Whether `device` computes bf16 natively; elsewhere autocast emulates it, slower than fp32."""
    import torch

    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: not detected, so "auto" stays fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def use_bf16(config: DistillConfig, device: str) -> bool:
    return config.autocast == "bf16" or (config.autocast == "auto" and bf16_native(device))


def student_forward(student: Any, ids: Any, bf16: bool) -> Any:
    """The student's fp32 logits and final hidden state (as `.logits`, `.hidden_states[-1]`).
    With `bf16` the decoder runs under bf16 autocast and the LM head outside it: bf16 keeps ~3
    significant digits (~0.05 on a logit of 10), too coarse for the KL the student learns from."""
    import torch

    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = student.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    hidden = hidden.float()
    return SimpleNamespace(logits=student.get_output_embeddings()(hidden), hidden_states=(hidden,))


def load_tokenizer(teacher_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(teacher_dir) / "tokenizer.json"))


TEACHER_TOKENS_TRIMMED = (
    "distill.teacher_tokens: not supported for a trimmed vocabulary ([trim_vocab]); "
    "use distill.chat_tokens for teacher-written data"
)


def training_ids(
    config: DistillConfig,
    tok: Any,
    model: Any,
    device: str,
    teacher_dir: Path | None = None,
    keep_dir: Path | None = None,
    convert: Callable[[list[int]], list[int]] | None = None,
) -> tuple[np.ndarray, dict]:
    """Training sequences [N, seq_len] from the text span (+ teacher samples), and where from.

    What the teacher writes (text continuations, chats) is kept in `keep_dir` when given and read
    back from there: a resumed run trains on the same data, in the same order, without spending
    the minutes to sample it again (sampling would not repeat across processes). `convert` maps
    what the teacher wrote (its ids) into `tok`'s ids when the student's vocabulary differs."""
    text, where = read_span(config.text, config.span, "distill.text")
    ids = tok.encode(text, add_special_tokens=False).ids
    where["text_tokens"] = len(ids)
    if config.teacher_tokens and convert is not None:  # run refuses this earlier, before any work
        raise ExportError(TEACHER_TOKENS_TRIMMED)
    if config.teacher_tokens:
        generated = _kept(keep_dir, TEACHER_TEXT, lambda: teacher_text(model, ids, config, device))
        where["teacher_tokens"] = len(generated)
        ids = ids + generated
    keep = None
    if config.exclude_qa is not None:
        keep = qa.unlike(qa.load(resolve_text(config.exclude_qa, "distill.exclude_qa")))
    if (config.chat_tokens or config.questions is not None) and teacher_dir is None:
        raise ExportError("distill.chat_tokens / questions need the teacher's folder (its chat template)")
    chats: list[list[int]] = []
    if config.chat_tokens:
        chats = _kept(
            keep_dir,
            CHATS,
            lambda: [
                c
                for c, _ in teacher_chats(
                    model, teacher_dir, config.chat_tokens, config.chat_max_answer, config.seed, device, keep
                )
            ],
        )
        where["chat_turns"] = len(chats)
    if config.questions is not None:
        asked = read_questions(config.questions, keep)
        turns = _kept(
            keep_dir,
            QUESTIONS,
            lambda: [
                c
                for c, _ in teacher_answers(
                    model, teacher_dir, asked, config.chat_max_answer, config.seed, device
                )
            ],
        )
        where["question_turns"] = len(turns)
        chats = chats + turns
    if chats:
        if convert is not None:
            chats = [convert(c) for c in chats]
        where["chat_tokens"] = sum(len(c) for c in chats)
        where["chat_example"] = tok.decode(chats[0], skip_special_tokens=False)[:400]
        # One stream after the text, cut into seq_len rows like it; rows are shuffled per epoch.
        ids = ids + [i for c in chats for i in c]
    n = len(ids) // config.seq_len
    if n < 1:
        raise ExportError(
            f"distill: {where['file']} span {config.span} has fewer than {config.seq_len} tokens"
        )
    return np.asarray(ids[: n * config.seq_len], dtype=np.int64).reshape(n, config.seq_len), where


def read_questions(path: Path, keep: Callable[[str], bool] | None) -> list[str]:
    """The `questions` file's questions (blank lines and # comments skipped); refused when one
    asks an excluded QA question again (`keep` False)."""
    where = resolve_text(path, "distill.questions")
    lines = [s.strip() for s in where.read_text(encoding="utf-8").splitlines()]
    asked = [s for s in lines if s and not s.startswith("#")]
    if not asked:
        raise ExportError(f"distill.questions: {where} holds no question")
    clash = [q for q in asked if keep is not None and not keep(q)]
    if clash:
        raise ExportError(
            f"distill.questions: {where} asks evaluation questions again (distill.exclude_qa): {clash[:3]}"
        )
    return asked


def _kept(folder: Path | None, name: str, make: Callable[[], Any]) -> Any:
    """`make()`'s JSON value, written atomically to folder/name, or read from there if present."""
    path = None if folder is None else folder / name
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    value = make()
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    return value


def teacher_text(teacher: Any, ids: list[int], config: DistillConfig, device: str) -> list[int]:
    """Sample `teacher_tokens` tokens from the teacher, prompted with short pieces of the text."""
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    out: list[int] = []
    rows, new = 8, config.seq_len - 16
    while len(out) < config.teacher_tokens:
        starts = torch.randint(0, max(1, len(ids) - 16), (rows,), generator=gen).tolist()
        prompt = torch.tensor([ids[s : s + 16] for s in starts], device=device)
        with torch.inference_mode():
            seqs = teacher.generate(prompt, max_new_tokens=new, do_sample=True, top_p=0.95, temperature=1.0)
        for row in seqs.tolist():
            out.extend(row)
    return out[: config.teacher_tokens]


def held_out_ids(config: DistillConfig, tok: Any) -> np.ndarray | None:
    """Token ids of the held-out span the learning curve is measured on (None: no curve)."""
    if not config.eval_every:
        return None
    ecfg = evaluate.EvaluateConfig(
        text=config.text,
        span=config.eval_span,
        max_tokens=config.eval_tokens,
        context=config.eval_context,
        stride=config.eval_context,
    )
    return evaluate.tokenize_span(ecfg, lambda text: tok.encode(text, add_special_tokens=False).ids)[0]


def curve_point(student: Any, ids: np.ndarray, config: DistillConfig, device: str, tokens: int) -> dict:
    """The student's held-out perplexity now (one point of the learning curve)."""
    t = time.perf_counter()
    was_training = student.training
    student.eval()
    logits = model_logits(student, device)
    ppl = evaluate.score(ids, logits, config.eval_context, config.eval_context)["perplexity"]
    student.train(was_training)
    return {"tokens": tokens, "perplexity": round(ppl, 4), "seconds": round(time.perf_counter() - t, 1)}


def lr_at(config: DistillConfig, step: int, seconds: float = 0.0) -> float:
    """Warmup then cosine decay; with `max_minutes`, the decay follows elapsed time when that is
    further along, so a run cut by the clock still ends at the low learning rate."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.max_minutes:
        progress = max(progress, seconds / (60 * config.max_minutes))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def losses(
    config: DistillConfig, s_out: Any, t_out: Any, labels: Any, targets: tuple[Any, Any, Any] | None = None
) -> dict[str, Any]:
    """The loss parts; the KL from the teacher's output `t_out`, or from its cached top-k
    `targets` (ids, log-probs, tail log-mass) when `t_out` is None."""
    import torch.nn.functional as F

    T = config.temperature
    s = s_out.logits.float()
    parts: dict[str, Any] = {}
    if config.kl_weight:
        if t_out is None:
            assert targets is not None
            kl = distill_targets.topk_kl(s, *targets, T)
        else:
            t_lp = F.log_softmax(t_out.logits.float() / T, dim=-1)
            s_lp = F.log_softmax(s / T, dim=-1)
            kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
        parts["kl"] = kl * (T * T) * config.kl_weight
    if config.hidden_weight:
        cos = F.cosine_similarity(s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float(), dim=-1)
        parts["hidden"] = (1 - cos).mean() * config.hidden_weight
    if config.ce_weight:
        parts["ce"] = (
            F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), labels[:, 1:].reshape(-1)) * config.ce_weight
        )
    return parts


def run(
    config: DistillConfig, teacher_dir: Path, student_dir: Path, out_dir: Path, progress: bool = True
) -> dict:
    """Distill `teacher_dir` into the model in `student_dir`; write the result to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    # A trimmed vocabulary (export/trim_vocab.py): the student's ids are a subset of the
    # teacher's; the teacher reads them mapped back and scores only the student's tokens.
    vmap = trim_vocab.teacher_ids(student_dir)
    if vmap is not None and config.teacher_tokens:  # before minutes of loading and sampling
        raise ExportError(TEACHER_TOKENS_TRIMMED)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    teacher = load_model(teacher_dir, device)
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).to(device)
    if vmap is None and teacher.config.vocab_size != student.config.vocab_size:
        raise ExportError("distill: teacher and student vocabularies differ (and no vocab_map.json)")
    if vmap is not None and (
        len(vmap) != student.config.vocab_size or vmap.max() >= teacher.config.vocab_size
    ):
        raise ExportError(f"distill: {student_dir}/{trim_vocab.MAP} does not match the two models")
    for p in teacher.parameters():
        p.requires_grad_(False)
    if config.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    tok = load_tokenizer(student_dir)  # the teacher's own unless the vocabulary was trimmed
    convert = None
    if vmap is not None:
        teacher_tok = load_tokenizer(teacher_dir)
        encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
        convert = lambda ids: trim_vocab.retokenize(ids, teacher_tok, encode)  # noqa: E731
    data, where = training_ids(config, tok, teacher, device, teacher_dir, out_dir, convert)
    to_teacher = None
    if vmap is not None:
        trim_vocab.restrict_head(teacher, vmap)  # after the teacher wrote its chats
        to_teacher = torch.from_numpy(vmap).to(device)
    held_out = held_out_ids(config, tok)
    targets = None
    if config.teacher_topk:
        where_k = distill_targets.targets_path(
            qa.model_digest(teacher_dir), data, config.teacher_topk, config.temperature, vmap
        )
        targets = distill_targets.Targets(data, config.teacher_topk, config.temperature, where_k)
    bf16 = use_bf16(config, device)
    ckpt_path = out_dir / CHECKPOINT
    state = {"step": 0, "history": [], "seconds": 0.0, "resumed_at": [], "curve": []}
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        student.load_state_dict(ckpt["student"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        state["resumed_at"].append(state["step"])
        log.warning("distill: resuming from step %d of %d", state["step"], config.steps)
    state.setdefault("curve", [])
    per_step = config.batch * config.grad_accum
    if held_out is not None and not state["curve"]:
        state["curve"].append(curve_point(student, held_out, config, device, 0))
    student.train()
    bar = _bar(config, state["step"], progress)
    t_start, stopped = time.perf_counter() - state["seconds"], "budget"
    want_hidden = config.hidden_weight > 0
    while state["step"] < config.steps:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(config, step, state["seconds"])
        totals: dict[str, float] = {}
        for micro in range(config.grad_accum):
            rows = _rows(data.shape[0], (step * per_step) + micro * config.batch, config.batch, config.seed)
            ids = torch.from_numpy(data[rows]).to(device)
            t_out = cached = None
            if targets is not None:
                cached = targets.get(rows, ids, lambda x: _teacher(teacher, x, to_teacher).logits)
            else:
                t_out = _teacher(teacher, ids, to_teacher, want_hidden)
            s_out = student_forward(student, ids, bf16)
            parts = losses(config, s_out, t_out, ids, cached)
            loss = sum(parts.values()) / config.grad_accum
            loss.backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / config.grad_accum
            del t_out, cached, s_out, parts, loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["seconds"] = time.perf_counter() - t_start
        state["history"].append({"step": step + 1, **{k: round(v, 5) for k, v in totals.items()}})
        if bar is not None:
            bar.update(1)
            tok_s = state["step"] * per_step * config.seq_len / max(state["seconds"], 1e-9)
            bar.set_postfix(loss=f"{sum(totals.values()):.4f}", tok_s=f"{tok_s:.0f}")
        out_of_time = config.max_minutes and state["seconds"] > 60 * config.max_minutes
        last = state["step"] == config.steps or out_of_time
        if held_out is not None and (state["step"] % config.eval_every == 0 or last):
            tokens = state["step"] * per_step * config.seq_len
            state["curve"].append(curve_point(student, held_out, config, device, tokens))
            log.info("distill: %d tokens, held-out perplexity %.3f", tokens, state["curve"][-1]["perplexity"])
            t_start += state["curve"][-1]["seconds"]  # the time cap and tok/s count training only
        done = state["step"] * per_step * config.seq_len
        for at in config.save_at:  # the snapshots this step reached
            if done - per_step * config.seq_len < at <= done:
                _save_student(student, student_dir, out_dir / f"at-{at}")
                student.train()
        if state["step"] % config.checkpoint_every == 0 or last:
            _checkpoint(ckpt_path, student, opt, state)
            if targets is not None:
                targets.save()
        if out_of_time:
            stopped = "max_minutes"
            break
    if bar is not None:
        bar.close()
    _save_student(student, student_dir, out_dir)
    hist = state["history"]
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "device": device,
        "text": where,
        "steps": state["step"],
        "planned_steps": config.steps,
        "tokens_trained": state["step"] * per_step * config.seq_len,
        "stopped_by": stopped,
        "seconds": round(state["seconds"], 1),
        "bf16": bf16,
        # This process's teacher forwards (0 when every row's targets were cached already).
        "teacher_rows": None if targets is None else targets.teacher_rows,
        "resumed_at_steps": state["resumed_at"],
        "first_loss": hist[0] if hist else None,
        "last_loss": hist[-1] if hist else None,
        "history": hist,
        "curve": state["curve"],
    }
    (out_dir / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    ckpt_path.unlink(missing_ok=True)
    return report


def _teacher(teacher: Any, ids: Any, to_teacher: Any, hidden: bool = False) -> Any:
    """The teacher's output on the student's ids (mapped to its own when the vocabulary was trimmed)."""
    import torch

    with torch.no_grad():
        t_ids = ids if to_teacher is None else to_teacher[ids]
        return teacher(t_ids, output_hidden_states=hidden, use_cache=False)


def _save_student(student: Any, student_dir: Path, folder: Path) -> None:
    """The student (eval mode) with the input folder's tokenizer files, as an HF folder."""
    student.eval().save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(student_dir) / name).is_file():
            shutil.copy2(Path(student_dir) / name, folder / name)


def _rows(n: int, start: int, count: int, seed: int) -> np.ndarray:
    """Rows start..start+count of the endless shuffled sequence of epochs (resumable by position)."""
    idx = np.arange(start, start + count)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(idx // n):
        mask = idx // n == epoch
        out[mask] = order(n, seed, int(epoch))[idx[mask] % n]
    return out


def _checkpoint(path: Path, student: Any, opt: Any, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({"student": student.state_dict(), "optimizer": opt.state_dict(), "state": state}, tmp)
    os.replace(tmp, path)


def _bar(config: DistillConfig, done: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=done, desc="distill", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------- as a recipe stage


def build(config: DistillConfig, art: Artifact, out: Path, progress: bool) -> None:
    run(config, art.teacher, art.hf_dir, out, progress=progress)


def result(config: DistillConfig, art: Artifact, folder: Path) -> Artifact:
    rep = json.loads((folder / REPORT).read_text())
    facts = {
        "tokens": rep["tokens_trained"],
        "steps": rep["steps"],
        "train_seconds": rep["seconds"],
        "text": rep["text"],
        "first_loss": rep["first_loss"],
        "last_loss": rep["last_loss"],
        "held_out_curve": [(c["tokens"], c["perplexity"]) for c in rep.get("curve", [])],
    }
    return replace(art, hf_dir=folder, facts=facts)


STAGE = Stage("distill", build, result)
