"""Drive and measure a graph written by `export.fuse`: a reference decode-loop driver, timings,
and numeric checks against transformers.

In: a fused `model.onnx` (and for the checks the Hugging Face folder it came from).
Out: `FusedRunner`, the minimal correct way to feed the graph (shared KV buffers bound with IO
binding, attention_mask built from per-row lengths); `bench_*` timings in ms per forward;
`greedy_match` / `top1_agreement` numeric checks. CLI: `python -m export.fuse_check --help`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def make_session(
    model: Path | str,
    threads: int = 2,
    spin: bool = True,
    level: str = "all",
    mem_pattern: bool = True,
    arena: bool = True,
    config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[level]
    so.enable_mem_pattern = mem_pattern
    so.enable_cpu_mem_arena = arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def graph_facts(session: ort.InferenceSession) -> dict[str, Any]:
    """Layers, KV heads, head dim, vocab and logits mode, read back from the graph IO."""
    ins = {i.name: i for i in session.get_inputs()}
    outs = {o.name: o for o in session.get_outputs()}
    kv = ins["past_key_values.0.key"].shape
    logits = outs["logits"].shape
    return {
        "layers": sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key")),
        "kv_heads": int(kv[1]),
        "head_dim": int(kv[3]),
        "vocab": int(logits[2]),
        "logits": "last" if logits[1] == 1 else "tail" if "logits_to_keep" in ins else "all",
        "query_seqlens": "query_seqlens" in ins,
    }


class FusedRunner:
    """Feeds a fused graph: one preallocated [B, kv_heads, capacity, head_dim] buffer per layer
    and K/V, bound as both past and present, so GQA writes new rows in place (no copy).

    `lengths[b]` is how many positions row b holds. `step` appends each row's new tokens
    (right padded to S) and returns the logits; `truncate` drops tokens (rejected drafts) by
    lowering the length: stale rows beyond it are simply overwritten later.
    """

    def __init__(self, session: ort.InferenceSession, batch: int, capacity: int) -> None:
        self.session = session
        self.facts = graph_facts(session)
        self.batch, self.capacity = batch, capacity
        shape = (batch, self.facts["kv_heads"], capacity, self.facts["head_dim"])
        self.kv = {
            f"{i}.{kind}": np.zeros(shape, np.float32)
            for i in range(self.facts["layers"])
            for kind in ("key", "value")
        }
        self.lengths = np.zeros(batch, np.int64)

    def _bind_kv(self, io: ort.IOBinding, rows: slice) -> None:
        for name, buf in self.kv.items():
            view = buf[rows]  # a run of whole rows of a C-contiguous buffer is contiguous
            ptr, shape = view.ctypes.data, list(view.shape)
            io.bind_input(f"past_key_values.{name}", "cpu", 0, np.float32, shape, ptr)
            io.bind_output(f"present.{name}", "cpu", 0, np.float32, shape, ptr)

    def step(
        self,
        ids: np.ndarray,
        new_lens: Sequence[int] | None = None,
        rows: slice | None = None,
        keep: int = 1,
    ) -> np.ndarray:
        """Run ids [b, S] for `rows` (default: all) of the batch; returns logits [b, 1|S|keep, V].

        new_lens[b] = real tokens in row b (the rest is right padding); default S for all.
        Rows with new_lens 0 are idle (their cache is untouched; needs query_seqlens input).
        keep: with a logits="tail" graph, how many of each row's last real tokens get logits.
        """
        rows = rows or slice(0, self.batch)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b, s = ids.shape
        new = np.full(b, s, np.int64) if new_lens is None else np.asarray(new_lens, np.int64)
        total = self.lengths[rows] + new
        if (self.lengths[rows] + s).max() > self.capacity:  # GQA: past + padded chunk must fit
            raise ValueError(f"pasts {self.lengths[rows].tolist()} + {s} exceed capacity {self.capacity}")
        width = int(max(total.max(), s))
        mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)  # ones, then zeros
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        if self.facts["query_seqlens"]:
            io.bind_cpu_input("query_seqlens", new.astype(np.int32))
        elif not np.all((new == s) | (self.lengths[rows] == 0)):
            raise ValueError("rows with fewer than S new tokens over a past need query_seqlens")
        elif b > 1 and s > 1 and self.lengths[rows].any():
            # GQA without its query_seqlens input refuses this itself ("batch_size must be 1 when
            # sequence_length > 1 and past context is given"); say which graph option allows it.
            raise ValueError("multi-token steps of several rows over a past need query_seqlens")
        mode = self.facts["logits"]
        if mode == "tail":
            io.bind_cpu_input("logits_to_keep", np.array(keep, np.int64))
        rows_out = {"last": 1, "all": s, "tail": keep}[mode]
        logits = np.empty((b, rows_out, self.facts["vocab"]), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._bind_kv(io, rows)
        self.session.run_with_iobinding(io)
        self.lengths[rows] = total
        return logits

    def truncate(self, row: int, length: int) -> None:
        self.lengths[row] = min(int(self.lengths[row]), length)


# --------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) wall ms of fn; min is the least noisy number on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def bench_fused(
    session: ort.InferenceSession, batch: int, seq: int, past: int, capacity: int, runs: int
) -> tuple[float, float]:
    """One forward of `seq` tokens per row on top of `past` cached ones, repeated in place."""
    runner = FusedRunner(session, batch, capacity)
    ids = np.random.default_rng(0).integers(0, runner.facts["vocab"], (batch, seq))

    def once() -> None:
        runner.lengths[:] = past
        runner.step(ids)

    return time_ms(once, runs)


def bench_optimum(
    session: ort.InferenceSession, batch: int, seq: int, past: int, runs: int
) -> tuple[float, float]:
    """Same shapes on a plain optimum export (concat KV cache, past copied into present)."""
    ins = {i.name: i for i in session.get_inputs()}
    kv = ins["past_key_values.0.key"].shape
    rng = np.random.default_rng(0)
    io = session.io_binding()
    keep = []
    for name in ins:
        if name.startswith("past_key_values."):
            arr = rng.standard_normal((batch, kv[1], past, kv[3])).astype(np.float32)
            keep.append(arr)
            io.bind_cpu_input(name, arr)
    for out in session.get_outputs():
        io.bind_output(out.name, "cpu")
    io.bind_cpu_input("input_ids", rng.integers(0, 1000, (batch, seq)).astype(np.int64))
    io.bind_cpu_input("attention_mask", np.ones((batch, past + seq), np.int64))
    if "position_ids" in ins:
        pos = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        io.bind_cpu_input("position_ids", pos)
    return time_ms(lambda: session.run_with_iobinding(io), runs)


# --------------------------------------------------------------------------- numeric checks


def greedy_match(hf_dir: Path, model: Path, prompt: str, steps: int) -> tuple[list[int], list[int]]:
    """Greedy continuation by transformers and by the fused graph (prefill, then 1-token
    decode steps); returns (reference ids, graph ids), prompt excluded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(prompt)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
    runner = FusedRunner(make_session(model), 1, len(ids) + steps + 1)
    got: list[int] = []
    logits = runner.step(np.array([ids]))
    for _ in range(steps):
        got.append(int(logits[0, -1].argmax()))
        logits = runner.step(np.array([[got[-1]]]))
    return ref[0, len(ids) :].tolist(), got


def top1_agreement(
    hf_dir: Path, models: dict[str, Path], text: str, window: int = 512, windows: int = 4
) -> dict[str, dict[str, float]]:
    """Teacher-forced windows of `text`: per graph (logits="all"), the share of positions whose
    argmax equals transformers', the max |logit diff|, and perplexity (transformers too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(text)["input_ids"][: window * windows]
    chunks = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for chunk in chunks:
            refs.append(hf(torch.tensor([chunk])).logits[0].numpy())
    out = {"transformers": {"ppl": _ppl(refs, chunks)}}
    for name, path in models.items():
        session = make_session(path)
        got = [FusedRunner(session, 1, window).step(np.array([c]))[0] for c in chunks]
        agree = np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, refs, strict=True)])
        err = max(float(np.abs(g - r).max()) for g, r in zip(got, refs, strict=True))
        out[name] = {"top1": float(agree.mean()), "max_abs_diff": err, "ppl": _ppl(got, chunks)}
    return out


def _ppl(logits: list[np.ndarray], chunks: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for lg, ids in zip(logits, chunks, strict=True):
        lg = lg[:-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll += float((lse - lg[np.arange(len(ids) - 1), ids[1:]]).sum())
        n += len(ids) - 1
    return float(np.exp(nll / n))


# --------------------------------------------------------------------------- CLI


def bench_table(
    models: dict[str, Path],
    cases: list[tuple[int, int]],
    past: int,
    runs: int,
    rounds: int,
    session_kw: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """ms per forward for each model and (batch, seq) case. Models run interleaved, `rounds`
    times, and each cell keeps the best round's median: on a shared machine that filters out
    rounds disturbed by other processes. Names starting with "optimum" use the concat-cache
    driver."""
    sessions = {name: make_session(path, **(session_kw or {})) for name, path in models.items()}
    table: dict[str, dict[str, float]] = {name: {} for name in models}
    for _ in range(rounds):
        for batch, seq in cases:
            for name, session in sessions.items():
                if name.startswith("optimum"):
                    med, _ = bench_optimum(session, batch, seq, past, runs)
                else:
                    med, _ = bench_fused(session, batch, seq, past, past + seq + 1, runs)
                key = f"B{batch}xS{seq}"
                table[name][key] = min(table[name].get(key, float("inf")), med)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.fuse_check")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="ms per forward, fused graphs (and optimum) interleaved")
    b.add_argument("models", nargs="+", help="NAME=PATH; a NAME starting 'optimum' = concat cache")
    b.add_argument("--cases", default="1x1,1x4,1x16,2x1,4x1,8x1", help="BATCHxSEQ list")
    b.add_argument("--past", type=int, default=128)
    b.add_argument("--runs", type=int, default=20)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--no-spin", action="store_true")
    b.add_argument("--level", default="all", choices=["disable", "basic", "extended", "all"])
    c = sub.add_parser("check", help="greedy match and WikiText top-1 against transformers")
    c.add_argument("--hf", type=Path, required=True)
    c.add_argument("--last", nargs="+", default=[], help="NAME=PATH of logits='last' graphs")
    c.add_argument("--all", nargs="+", default=[], help="NAME=PATH of logits='all' graphs")
    c.add_argument("--prompt", default="The capital of France is")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--text", type=Path)
    c.add_argument("--window", type=int, default=512)
    c.add_argument("--windows", type=int, default=4)
    args = parser.parse_args(argv)

    def pairs(items: list[str]) -> dict[str, Path]:
        return {k: Path(v) for k, v in (item.split("=", 1) for item in items)}

    if args.cmd == "bench":
        cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
        kw = {"threads": args.threads, "spin": not args.no_spin, "level": args.level}
        table = bench_table(pairs(args.models), cases, args.past, args.runs, args.rounds, kw)  # type: ignore[arg-type]
        keys = [f"B{b}xS{s}" for b, s in cases]
        print(f"{'ms/forward (tok/s)':24s}" + "".join(f"{k:>18s}" for k in keys))
        for name, row in table.items():
            cells = []
            for (bt, sq), k in zip(cases, keys, strict=True):
                cells.append(f"{row[k]:8.2f} ({bt * sq / row[k] * 1e3:6.1f})")
            print(f"{name:24s}" + "".join(f"{x:>18s}" for x in cells))
        return
    for name, path in pairs(args.last).items():
        ref, got = greedy_match(args.hf, path, args.prompt, args.steps)
        same = next((i for i, (x, y) in enumerate(zip(ref, got, strict=True)) if x != y), len(ref))
        print(f"{name}: greedy tokens equal to transformers for {same}/{len(ref)} steps")
    if args.text and args.all:
        text = args.text.read_text(encoding="utf-8")[:200_000]
        stats = top1_agreement(args.hf, pairs(args.all), text, args.window, args.windows)
        for name, row in stats.items():
            print(f"{name}: " + ", ".join(f"{k} {v:.5g}" for k, v in row.items()))


if __name__ == "__main__":
    main()
