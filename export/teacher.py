"""The teacher: the unpruned fp32 Hugging Face model that distillation learns from and evaluation
compares against (torch on CPU or CUDA). Its logits over token windows, and chat turns it writes
itself the Magpie way: the teacher gets its chat template up to an empty user turn, writes the
question, then answers it — chat data without a dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_llm.errors import ExportError
from export.hf import hf_tokenizer, special_ids

Logits = Callable[[np.ndarray], np.ndarray]  # ids [S] -> logits [S, V] (float32)
CHAT_ROWS = 32  # conversations generated together (CPU generate: wider batches are nearly free)


def load_model(hf_dir: Path, device: str = "cpu", threads: int = 0) -> Any:
    """The HF causal LM in `hf_dir`, fp32, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()


def model_logits(model: Any, device: str = "cpu") -> Logits:
    """A logits function over an in-memory HF causal LM (put it in eval mode first)."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(ids[None].astype(np.int64)).to(device), use_cache=False)
        return out.logits[0].float().cpu().numpy()

    return run


def torch_logits(hf_dir: Path, threads: int = 0) -> tuple[Logits, Any]:
    """A logits function running the HF model in `hf_dir` with torch (fp32, CPU), and the model."""
    model = load_model(hf_dir, "cpu", threads)
    return model_logits(model), model


def chats(
    teacher: Any,
    teacher_dir: Path,
    tokens: int,
    max_answer: int,
    seed: int,
    device: str,
    keep: Callable[[str], bool] | None = None,
    greedy: bool = False,
) -> list[tuple[list[int], int]]:
    """Conversations of about `tokens` tokens in all, each the templated user question the
    teacher wrote (prompted with its template up to an empty user turn) and its own answer
    (at most `max_answer` tokens, sampled with `seed`, or its greedy answer with `greedy`):
    (ids, prompt length) each. `keep`: a question it returns False for is not answered (e.g.
    one of an evaluation set)."""
    import torch

    hf_tok = hf_tokenizer(teacher_dir)
    if not hf_tok.chat_template:
        raise ExportError(f"chat_tokens: {teacher_dir} has no chat template")
    # The ids the runtime stops on (end of turn first), as the bundle records them.
    stop = special_ids(Path(teacher_dir))[1]
    mark = "\u2063QUESTION\u2063"
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    prefix = hf_tok(rendered[: rendered.index(mark)], add_special_tokens=False)["input_ids"]
    torch.manual_seed(seed)  # generate() samples from torch's global generator
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else stop[0]
    out_chats: list[tuple[list[int], int]] = []
    total = empty_rounds = 0
    while total < tokens:
        start = torch.tensor([prefix] * CHAT_ROWS, device=device)
        with torch.inference_mode():
            asked = teacher.generate(
                start, attention_mask=torch.ones_like(start), max_new_tokens=48, **_sampling(stop, pad)
            )[:, len(prefix) :].tolist()
        questions = [hf_tok.decode(until(q, stop), skip_special_tokens=True).strip() for q in asked]
        questions = [q for q in questions if q and (keep is None or keep(q))]
        if not questions:
            empty_rounds += 1
            if empty_rounds == 10:
                raise ExportError("chat_tokens: the teacher wrote no user question in 10 tries")
            continue
        for chat in _answer(teacher, hf_tok, questions, max_answer, stop, pad, device, greedy):
            out_chats.append(chat)
            total += len(chat[0])
    return out_chats


def answers(
    teacher: Any, teacher_dir: Path, questions: list[str], max_answer: int, seed: int, device: str
) -> list[tuple[list[int], int]]:
    """Chat turns of the given user `questions` with the teacher's answers (sampled as in
    `chats`, with `seed`): (ids, prompt length) each, in the questions' order."""
    import torch

    hf_tok = hf_tokenizer(teacher_dir)
    if not hf_tok.chat_template:
        raise ExportError(f"questions: {teacher_dir} has no chat template")
    stop = special_ids(Path(teacher_dir))[1]
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else stop[0]
    torch.manual_seed(seed)
    out: list[tuple[list[int], int]] = []
    for i in range(0, len(questions), CHAT_ROWS):
        out += _answer(teacher, hf_tok, questions[i : i + CHAT_ROWS], max_answer, stop, pad, device)
    return out


def _sampling(stop: list[int], pad: int) -> dict[str, Any]:
    return {"do_sample": True, "top_p": 0.95, "temperature": 1.0, "eos_token_id": stop, "pad_token_id": pad}


def _answer(
    teacher: Any,
    hf_tok: Any,
    questions: list[str],
    max_answer: int,
    stop: list[int],
    pad: int,
    device: str,
    greedy: bool = False,
) -> list[tuple[list[int], int]]:
    """One batch: each question templated as a user turn, answered by the teacher (left-padded
    prompts; sampled, or greedy with `greedy`), with its end of turn when the answer ended
    before `max_answer`."""
    import torch

    prompts = [
        hf_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    if greedy:  # the QA check's loop; finished rows leave the batch (answers run 10-160 tokens)
        rows = greedy_batch(teacher, prompts, max_answer, set(stop), shrink=True, device=device)
        return [
            (p + new + ([stop[0]] if ended else []), len(p))
            for p, (new, ended) in zip(prompts, rows, strict=True)
        ]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = teacher.generate(ids, attention_mask=mask, max_new_tokens=max_answer, **_sampling(stop, pad))
    chats = []
    for p, answer in zip(prompts, out[:, width:].tolist(), strict=True):
        kept = until(answer, stop)
        chats.append((p + kept + ([stop[0]] if len(kept) < len(answer) else []), len(p)))
    return chats


def greedy_batch(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: set[int],
    done: Callable[[list[int]], bool] | None = None,
    shrink: bool = False,
    device: str = "cpu",
) -> list[tuple[list[int], bool]]:
    """Greedy continuations of left-padded `prompts` in one KV cache: (new ids without the stop
    id, whether a stop id ended it) per prompt. A row ends at a stop id or when `done(its new
    ids)` says so, the batch when every row has. `shrink`: finished rows leave the batch (their
    cache rows dropped), so long answers do not carry short ones' dead rows; a row's numbers may
    then differ in the last bit from an unshrunk batch (another GEMM shape).
    Why not `generate`: measured slower on a loaded 2-core host (benchmarks/README.md,
    *Speculative decoding with a trained draft*), and this loop is the one the QA check runs."""
    import torch

    width = max(map(len, prompts))
    x = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # pad: masked
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts positions from its own first token
    new: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    finished = [False] * len(prompts)
    live = list(range(len(prompts)))  # prompt index of each batch row
    past = None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            o = model(
                input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True
            )
            past, tokens = o.past_key_values, o.logits[:, -1].argmax(-1).tolist()
            for r, token in enumerate(tokens):
                i = live[r]
                if finished[i]:
                    continue
                if token in stop:
                    stopped[i] = finished[i] = True
                    continue
                new[i].append(token)
                finished[i] = done is not None and done(new[i])
            if all(finished[i] for i in live):
                break
            if shrink and any(finished[i] for i in live):
                keep = [r for r, i in enumerate(live) if not finished[i]]
                index = torch.tensor(keep, device=device)
                past.batch_select_indices(index)
                mask, pos, tokens, live = (
                    mask[index],
                    pos[index],
                    [tokens[r] for r in keep],
                    [live[r] for r in keep],
                )
            x = torch.tensor([[t] for t in tokens], device=device)
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=device)], 1)
            pos = pos[:, -1:] + 1
    return [(n, s) for n, s in zip(new, stopped, strict=True)]


def until(ids: list[int], stop: list[int]) -> list[int]:
    """`ids` up to (not including) the first stop token."""
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return ids[:cut]
