"""Stage train_draft: a quantized fused graph in, the same graph with its hidden state exposed plus
a small trained speculative draft out (`draft.onnx`, described by `edge_llm.bundle.DraftSpec`).

The draft is an EAGLE-style head without attention: from the main graph's final hidden state at
position t (what its LM head reads) and the token at t+1 it guesses the hidden state at t+1 and,
through a reduced-vocabulary head, the token at t+2; the guessed state is fed back for the next
draft token. Stateless on purpose: no draft KV cache to keep in step with the main one, one small
forward per draft token. It is trained against the main graph itself (run with ONNX Runtime, int8
as shipped), because acceptance is decided by that graph, not by the fp32 teacher:
  - data: the text span (WikiText train side; the evaluation span is never read) and chat turns
    the teacher writes itself (`export.teacher.chats`), each run through the main graph once for
    its hidden states and greedy tokens;
  - vocabulary: the `vocab` most frequent greedy tokens (+ end-of-turn ids); other input tokens
    share one extra row, and the head never proposes them;
  - loss: cross-entropy on the main graph's greedy token + smooth-L1 to its next hidden state,
    unrolled `unroll` steps on the head's own guessed states (what drafting feeds it).
The stage reports step-1 agreement and the mean accepted length a greedy chain of `k` drafts
would get on held-out chats and on the held-out text span; the runtime's real acceptance is
measured by `benchmarks/speculation.py`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_llm.bundle import PAD_INPUT, DraftSpec
from edge_llm.errors import ExportError
from export import draft_eagle
from export.hf import special_ids
from export.onnx_graph import link_or_copy
from export.stage import Artifact, Stage
from export.text import check_span, first_tokens, overlaps, read_span

log = logging.getLogger(__name__)
HIDDEN = "hidden_states"  # the main graph's extra output
REPORT = "draft.json"
DRAFT_FILE = "draft.onnx"
HELD_OUT = "held_out_chats.json"
KINDS = ("feature-mlp", draft_eagle.KIND)


@dataclass(frozen=True)
class DraftConfig:
    text: Path | None = None  # required; training text (relative: cwd, then the checkout root)
    span: tuple[float, float] = (0.1, 1.0)  # fraction of the file trained on
    eval_span: tuple[float, float] = (0.0, 0.1)  # held-out text the agreement is reported on
    tokens: int = 60_000  # text tokens run through the main graph for training
    eval_tokens: int = 4096
    chat_tokens: int = 16_000  # chat turns the teacher writes (10% held out for the report)
    chat_max_answer: int = 160
    chat_seed: int = 1
    # The teacher answers greedily: the runtime's chat answers are the main graph's greedy
    # tokens, and sampled answers (temperature 1) teach the draft text it will not be asked for.
    chat_greedy: bool = True
    seq_len: int = 256
    # "feature-mlp": the stateless head below; "eagle1": + one attention layer over the draft's
    # own history with its own KV cache (export/draft_eagle.py), trained on `window`-pair windows.
    kind: str = "feature-mlp"
    window: int = 128
    vocab: int = 8192  # draft vocabulary: the most frequent tokens the main graph emits
    intermediate: int = 1024  # the head's MLP width
    unroll: int = 3  # draft steps trained on the head's own guessed hidden states
    batch: int = 256
    lr: float = 2e-3
    epochs: float = 4.0
    max_minutes: float = 10.0  # wall-clock cap on training (0: none)
    hidden_weight: float = 1.0  # smooth-L1 to the next hidden state, beside the token CE
    k: int = 4  # draft length the reported mean accepted length assumes
    block_size: int = 64  # int8 blocks of the draft's MatMuls and embedding (0: keep fp32)
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_span(self.span, "draft.span")
        check_span(self.eval_span, "draft.eval_span")
        checks = [
            (not overlaps(self.span, self.eval_span), "eval_span overlaps the training span"),
            (self.tokens >= self.seq_len >= 8, "tokens >= seq_len >= 8"),
            (self.vocab >= 2 and self.intermediate >= 1, "vocab >= 2, intermediate >= 1"),
            (1 <= self.unroll <= 8 and 1 <= self.k <= 16, "unroll in 1..8, k in 1..16"),
            (self.batch >= 1 and self.lr > 0 and self.epochs > 0, "batch >= 1, lr > 0, epochs > 0"),
            (self.chat_tokens >= 0 and self.chat_max_answer >= 8, "chat_tokens >= 0, chat_max_answer >= 8"),
            (self.block_size >= 0 and self.max_minutes >= 0, "block_size, max_minutes >= 0"),
            (self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}"),
            (8 <= self.window <= 1024, "window in 8..1024"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"draft: {msg}")


# --------------------------------------------------------------------------- the main graph


def expose_hidden(graph: Path, out: Path, hidden: int) -> None:
    """Write `graph` to `out` with the LM head's input added as output `hidden_states` [B, K, H]
    (a fused graph: the final-normed state of the positions whose logits it returns)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(graph), load_external_data=False)
    names = {n.name: n for n in model.graph.node}
    source = names.get("tail_hidden") or names.get("norm")  # "last"/"tail" gather, else "all"
    if source is None:
        raise ExportError(f"{graph}: not a fused graph (no tail_hidden / norm node): no draft")
    if HIDDEN not in {o.name for o in model.graph.output}:
        model.graph.node.append(helper.make_node("Identity", [source.output[0]], [HIDDEN], name=HIDDEN))
        logits = next(o for o in model.graph.output if o.name == "logits")
        dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
        model.graph.output.append(
            helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, [*dims[:2], hidden])
        )
    data = graph.with_name(graph.name + ".data")
    onnx.save(model, str(out))
    if data.exists():
        link_or_copy(data, out.with_name(data.name))


class MainGraph:
    """The main graph run from an empty cache over whole sequences: hidden states + greedy ids."""

    def __init__(self, graph: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def run(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(hidden [S, H] float16, greedy next token [S] int32) for one sequence."""
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
        s = len(ids)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, s), np.int64),
        }
        if "logits_to_keep" in self.inputs:
            feeds["logits_to_keep"] = np.array(s, np.int64)
        if PAD_INPUT in self.inputs:  # the padded graph's switch: padded, as the runtime runs a lone row
            feeds[PAD_INPUT] = np.array(1, np.int32)
        for name, info in self.inputs.items():
            if name.startswith("past_key_values"):
                shape = info.shape
                # One spare position: a padded graph ([fuse] pad_query_row) writes its dummy
                # query row's KV at position s; an unpadded one leaves it unused.
                feeds[name] = np.zeros((1, shape[1], s + 1, shape[3]), types.get(info.type, np.float32))
        logits, hidden = self.session.run(["logits", HIDDEN], feeds)
        if logits.shape[1] != s:
            raise ExportError("draft: the main graph must return logits for every fed position")
        return hidden[0].astype(np.float16), logits[0].argmax(-1).astype(np.int32)


# --------------------------------------------------------------------------- data


@dataclass
class Corpus:
    """Sequences run through the main graph, concatenated: token, hidden, greedy per position."""

    ids: np.ndarray  # [P] int64
    hidden: np.ndarray  # [P, H] float16
    greedy: np.ndarray  # [P] int32 (the main graph's argmax after the token at that position)
    starts: np.ndarray  # [R] first position of each sequence
    lengths: np.ndarray  # [R]

    @classmethod
    def build(cls, main: MainGraph, seqs: list[list[int]]) -> Corpus:
        outs = [main.run(s) for s in seqs]
        lengths = np.array([len(s) for s in seqs], np.int64)
        return cls(
            np.concatenate([np.asarray(s, np.int64) for s in seqs]),
            np.concatenate([h for h, _ in outs]),
            np.concatenate([g for _, g in outs]),
            np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
            lengths,
        )

    def origins(self, unroll: int) -> np.ndarray:
        """Positions t with t+unroll inside the same sequence (a draft chain of `unroll` steps)."""
        return np.concatenate(
            [
                np.arange(a, a + n - unroll)
                for a, n in zip(self.starts, self.lengths, strict=True)
                if n > unroll
            ]
        )


def text_rows(config: DraftConfig, tok: Any, span: tuple[float, float], tokens: int) -> list[list[int]]:
    text, _ = read_span(config.text, span, "draft.text")
    ids = first_tokens(text, lambda t: tok.encode(t, add_special_tokens=False).ids, tokens)
    n = len(ids) // config.seq_len
    if n < 1:
        raise ExportError(f"draft: text span {list(span)} has fewer than {config.seq_len} tokens")
    return [ids[i * config.seq_len : (i + 1) * config.seq_len] for i in range(n)]


# How `chat_rows` writes chats (question sampler, greedy batched answers): part of the cache key.
CHATS_METHOD = "magpie-greedy-batch-v1"
CHATS_FILE = "chats.json"


def chat_rows(config: DraftConfig, teacher_dir: Path) -> list[tuple[list[int], int]]:
    """Chat turns the teacher writes itself (question and answer), `chat_tokens` in all:
    (ids, prompt length) each. Cached (stage folders `teacher-chats-<key>`) by the teacher's
    content and the chat settings: on a loaded 2-core host they are most of the stage's time,
    and another draft kind or training setting over the same teacher reuses them."""
    if not config.chat_tokens:
        return []
    import importlib.metadata
    import os

    from export import teacher
    from export.cache import cached_stage, stable_key
    from export.qa import model_digest

    versions = [importlib.metadata.version(m) for m in ("torch", "transformers")]
    settings = [config.chat_tokens, config.chat_max_answer, config.chat_seed, config.chat_greedy]
    key = stable_key(model_digest(teacher_dir), settings, CHATS_METHOD, versions)

    def build(out: Path) -> None:
        model = teacher.load_model(teacher_dir, "cpu", config.threads)
        rows = teacher.chats(
            model,
            teacher_dir,
            config.chat_tokens,
            config.chat_max_answer,
            config.chat_seed,
            "cpu",
            greedy=config.chat_greedy,
        )
        tmp = out / (CHATS_FILE + ".tmp")
        tmp.write_text(json.dumps([[ids, n] for ids, n in rows]), encoding="utf-8")
        os.replace(tmp, out / CHATS_FILE)

    folder, hit = cached_stage("teacher-chats", key, build)
    try:
        rows = json.loads((folder / CHATS_FILE).read_text(encoding="utf-8"))
        chats = [([int(i) for i in ids], int(n)) for ids, n in rows]
    except (OSError, ValueError, TypeError):
        raise ExportError(
            f"{folder}: cached teacher chats are damaged (remove the folder to recompute)"
        ) from None
    if hit:
        log.info("draft: %d teacher chats from the cache (%s)", len(chats), folder)
    return chats


def choose_vocab(corpus: Corpus, size: int, must: list[int]) -> np.ndarray:
    """The tokens the main graph emits most often (ties: lower id), `size` in all with the
    end-of-turn ids `must` always among them (the draft can then propose the end)."""
    counts = np.bincount(corpus.greedy, minlength=max(int(corpus.greedy.max()), *must) + 1)
    order = [int(t) for t in np.argsort(-counts, kind="stable") if counts[t] > 0 and int(t) not in must]
    return np.asarray(sorted(set(must)) + order[: max(0, size - len(set(must)))], np.int64)


# --------------------------------------------------------------------------- the head


def make_head(table: np.ndarray, intermediate: int, eps: float) -> Any:
    """The draft head (torch), its embedding/LM-head table initialised from the model's rows."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = table.shape[1]
            self.table = nn.Parameter(torch.from_numpy(table.copy()))  # [Vd + 1, H], tied in/out
            self.fc = nn.Parameter(torch.randn(2 * h, h) * (0.5 / h**0.5))
            self.norm = nn.Parameter(torch.ones(h))
            self.gate = nn.Parameter(torch.randn(h, intermediate) / h**0.5)
            self.up = nn.Parameter(torch.randn(h, intermediate) / h**0.5)
            self.down = nn.Parameter(torch.zeros(intermediate, h))  # starts as fc alone

        def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = torch.cat([hidden, self.table[rows]], -1) @ self.fc
            n = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * self.norm
            g = n @ self.gate
            f = z + (g * torch.sigmoid(g) * (n @ self.up)) @ self.down
            return f, f @ self.table.T

    return Head()


def train(
    head: Any,
    corpus: Corpus,
    vmap: np.ndarray,
    config: DraftConfig,
    progress: bool,
    first: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fit `head` on `corpus`: CE on the main graph's greedy token (in-vocabulary targets) and
    smooth-L1 to its hidden state, over `unroll` chained steps; returns what it did. `first`
    (eagle1): each sequence's first drafted position (a chat's answer)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    unk = int(vmap.max())  # the out-of-vocabulary row: never a target, never proposed
    if config.kind == draft_eagle.KIND:
        windows = draft_eagle.Windows(
            corpus, first if first is not None else np.ones(len(corpus.starts)), config.window
        )
        per = max(1, config.batch // config.window)  # `batch` counts pairs: windows of `window`
        steps = max(1, int(config.epochs * len(corpus.ids) / (per * config.window)))

        def batch_loss() -> Any:
            pick = rng.integers(len(windows), size=per)
            return draft_eagle.loss(head, windows.batch(pick, vmap), config.unroll, config.hidden_weight, unk)
    else:
        origins = corpus.origins(config.unroll)
        steps = max(1, int(config.epochs * len(origins) / config.batch))
        rows_of = torch.from_numpy(vmap)
        hidden = torch.from_numpy(corpus.hidden)
        ids, greedy = torch.from_numpy(corpus.ids), torch.from_numpy(corpus.greedy.astype(np.int64))

        def batch_loss() -> Any:
            t = torch.from_numpy(rng.choice(origins, config.batch))
            state = hidden[t].float()
            loss = torch.zeros(())
            for j in range(1, config.unroll + 1):
                state, logits = head(state, rows_of[ids[t + j]])
                target = rows_of[greedy[t + j]]
                target = torch.where(target == unk, torch.full_like(target, -100), target)
                loss = loss + F.cross_entropy(logits[:, :unk], target, ignore_index=-100)
                loss = loss + config.hidden_weight * F.smooth_l1_loss(state, hidden[t + j].float())
            return loss

    t0, done, losses, rates = time.perf_counter(), 0, [], []
    for step in range(steps):
        # Progress is steps or wall time, whichever is further along: under the time cap the
        # learning rate still warms up and anneals to zero (a schedule cut off at full rate
        # left the 2026-12-04 draft at 153 of 925 steps barely trained).
        elapsed = time.perf_counter() - t0
        frac = max(step / steps, elapsed / (60 * config.max_minutes) if config.max_minutes else 0.0)
        if frac >= 1.0:
            break
        rates.append(schedule(config.lr, frac))
        for group in opt.param_groups:
            group["lr"] = rates[-1]
        loss = batch_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = step + 1
        losses.append(loss.item() / config.unroll)
        if progress and done % 50 == 0:
            log.info(
                "draft: step %d (of %d planned, %.0f%% done) loss %.3f",
                done,
                steps,
                100 * frac,
                np.mean(losses[-50:]),
            )
    return {
        "steps": done,
        "planned_steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "loss_first": round(float(np.mean(losses[:20])), 4) if losses else None,
        "loss_last": round(float(np.mean(losses[-20:])), 4) if losses else None,
        "lr_peak": max(rates, default=0.0),
        "lr_last": rates[-1] if rates else 0.0,
    }


def schedule(peak: float, progress: float, warmup: float = 0.05) -> float:
    """Learning rate at `progress` in [0, 1): linear warm-up to `peak`, then cosine to zero."""
    if progress < warmup:
        return peak * progress / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def agreement(head: Any, corpus: Corpus, vmap: np.ndarray, vocab: np.ndarray, k: int) -> dict[str, Any]:
    """On held-out sequences: how often the draft's guess at step j = 1..k (fed the text's own
    tokens, its guessed states) is the main graph's greedy token. The runtime's acceptance is
    measured by decoding (benchmarks/speculation.py); this is the stage's quick check."""
    import torch

    origins = corpus.origins(k)
    if not len(origins):
        return {}
    hidden, ids = torch.from_numpy(corpus.hidden), torch.from_numpy(corpus.ids)
    rows_of, unk, full = torch.from_numpy(vmap), int(vmap.max()), torch.from_numpy(vocab)
    t = torch.from_numpy(origins)
    greedy = torch.from_numpy(corpus.greedy.astype(np.int64))
    top1 = []
    with torch.inference_mode():
        state = hidden[t].float()
        for j in range(1, k + 1):
            state, logits = head(state, rows_of[ids[t + j]])
            top1.append(round(float((full[logits[:, :unk].argmax(-1)] == greedy[t + j]).float().mean()), 4))
    return {"positions": len(origins), "top1_by_step": top1}


# --------------------------------------------------------------------------- ONNX


def write_onnx(head: Any, vmap: np.ndarray, eps: float, out: Path) -> None:
    """The head as a stateless fp32 ONNX graph (`DraftSpec`'s IO), one file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = {n: v.detach().float().numpy() for n, v in head.named_parameters()}
    h = p["table"].shape[1]
    inits = [
        numpy_helper.from_array(vmap.astype(np.int64), "vocab_map"),
        numpy_helper.from_array(p["table"], "draft.table"),
        numpy_helper.from_array(p["fc"], "draft.fc"),
        numpy_helper.from_array(p["norm"], "draft.norm"),
        numpy_helper.from_array(p["gate"], "draft.gate"),
        numpy_helper.from_array(p["up"], "draft.up"),
        numpy_helper.from_array(p["down"], "draft.down"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["vocab_map", "input_ids"], ["rows"], name="rows"),
        n("Gather", ["draft.table", "rows"], ["embedded"], name="embed"),
        n("Concat", ["hidden", "embedded"], ["joined"], name="join", axis=-1),
        n("MatMul", ["joined", "draft.fc"], ["z"], name="fc"),
        n("SimplifiedLayerNormalization", ["z", "draft.norm"], ["normed"], name="norm", axis=-1, epsilon=eps),
        *draft_eagle.mlp_head_nodes("normed", "z"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "edge_llm_draft",
        [
            helper.make_tensor_value_info("hidden", f32, ["n", h]),
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n"]),
        ],
        [
            helper.make_tensor_value_info("feature", f32, ["n", h]),
            helper.make_tensor_value_info("logits", f32, ["n", p["table"].shape[0]]),
        ],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        producer_name="edge-llm export.train_draft",
    )
    model.ir_version = 10
    onnx.save(model, str(out))


def quantize_draft(fp32: Path, out: Path, block: int) -> dict[str, Any]:
    """int8 MatMuls (MatMulNBits) and embedding (GatherBlockQuantized) through the one quantizer,
    saved back as a single file."""
    import onnx

    from export import quantize

    tmp = out.parent / "draft-int8"
    cfg = quantize.QuantizeConfig(mode="int8", block_size=block, accuracy_level=4, embeddings="int8")
    res = quantize.run(cfg, fp32, tmp)
    onnx.save(onnx.load(str(res.model_path)), str(out))
    shutil.rmtree(tmp)
    return quantize.summary(res.errors)


# --------------------------------------------------------------------------- as a recipe stage


def build(config: DraftConfig, art: Artifact, out: Path, progress: bool) -> None:
    import torch
    from tokenizers import Tokenizer

    if art.graph is None or art.layout.get("kv_layout") != "shared" or art.layout.get("logits") != "tail":
        raise ExportError("draft: needs the fused graph with logits 'tail' (to_onnx.graph 'fused')")
    torch.set_num_threads(config.threads)
    hf_config = json.loads((art.hf_dir / "config.json").read_text(encoding="utf-8"))
    eps = float(hf_config.get("rms_norm_eps", 1e-6))
    expose_hidden(art.graph, out / "model.onnx", int(hf_config["hidden_size"]))
    main = MainGraph(out / "model.onnx", config.threads)
    tok = Tokenizer.from_file(str(art.hf_dir / "tokenizer.json"))
    t0 = time.perf_counter()
    chats = chat_rows(config, art.teacher)
    held = max(1, len(chats) // 10) if chats else 0
    text = text_rows(config, tok, config.span, config.tokens)
    train_seqs = text + [ids for ids, _ in chats[held:]]
    # eagle1: the first drafted pair of each sequence (a chat's answer; the runtime's draft
    # history starts at the generation)
    first = np.asarray([1] * len(text) + [n for _, n in chats[held:]], np.int64)
    # The held-out chats, for benchmarks/draft_agreement.py --chats (not part of the bundle).
    (out / HELD_OUT).write_text(json.dumps([[ids, n] for ids, n in chats[:held]]) + "\n")
    corpus = Corpus.build(main, train_seqs)
    data_s = time.perf_counter() - t0
    eos = special_ids(art.hf_dir)[1]
    vocab = choose_vocab(corpus, config.vocab, eos)
    vmap = np.full(int(hf_config["vocab_size"]), len(vocab), np.int64)  # out of vocabulary: last row
    vmap[vocab] = np.arange(len(vocab))
    from export.fuse import load_weights

    emb = load_weights(art.hf_dir)["model.embed_tokens.weight"]
    table = np.concatenate([emb[vocab], emb.mean(0, keepdims=True)]).astype(np.float32)
    eagle = config.kind == draft_eagle.KIND
    theta = float(hf_config.get("rope_theta", 10000.0))
    if eagle:
        heads = int(hf_config["num_attention_heads"])
        head = draft_eagle.make_eagle(
            table, config.intermediate, eps, heads, theta, art_context(art, hf_config)
        )
    else:
        head = make_head(table, config.intermediate, eps)
    fit = train(head, corpus, vmap, config, progress, first)

    def check(seqs: list[list[int]], starts: list[int]) -> dict[str, Any]:
        held_corpus = Corpus.build(main, seqs)
        if eagle:
            windows = draft_eagle.disjoint(held_corpus, np.asarray(starts), config.window)
            return draft_eagle.agreement(head, windows, vmap, config.k)
        return agreement(head, held_corpus, vmap, vocab, config.k)

    eval_text = text_rows(config, tok, config.eval_span, config.eval_tokens)
    held_out = {"text": check(eval_text, [1] * len(eval_text))}
    if held:
        held_out["chat"] = check([ids for ids, _ in chats[:held]], [n for _, n in chats[:held]])
    fp32 = out / "draft-fp32.onnx"
    if eagle:
        draft_eagle.write_onnx(head, vmap, eps, theta, fp32)
    else:
        write_onnx(head, vmap, eps, fp32)
    quant = quantize_draft(fp32, out / DRAFT_FILE, config.block_size) if config.block_size else {}
    if config.block_size:
        fp32.unlink()
    else:
        fp32.rename(out / DRAFT_FILE)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "vocab": vocab.tolist(),
        "parameters": int(sum(p.numel() for p in head.parameters())),
        "draft_bytes": (out / DRAFT_FILE).stat().st_size,
        "training_positions": len(corpus.ids),
        "chat_turns": len(chats) - held,
        "held_out_chat_turns": held,
        "data_seconds": round(data_s, 1),
        "training": fit,
        "held_out": held_out,
        "quantization": quant,
    }
    (out / REPORT).write_text(json.dumps(report, indent=1) + "\n")


def art_context(art: Artifact, hf_config: dict[str, Any]) -> int:
    """The longest sequence the main graph serves: the draft's rotary table covers it."""
    return int(art.layout.get("context_length") or hf_config.get("max_position_embeddings", 2048))


def result(config: DraftConfig, art: Artifact, folder: Path) -> Artifact:
    rep = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    kind = rep["config"].get("kind", "feature-mlp")
    spec = DraftSpec(file=DRAFT_FILE, vocab=tuple(rep["vocab"]), kind=kind)
    facts = {"draft_bytes": rep["draft_bytes"], "held_out": rep["held_out"], "training": rep["training"]}
    return replace(
        art,
        graph=folder / "model.onnx",
        layout={**art.layout, "draft": spec},
        extra_graphs={**art.extra_graphs, DRAFT_FILE: folder / DRAFT_FILE},
        facts=facts,
    )


STAGE = Stage("train_draft", build, result)
