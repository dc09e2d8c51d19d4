"""Measure a fused bundle (`export.fuse` graph) as the runtime drives it: timings per forward and
numeric checks against transformers.

In: bundle folders with a fused graph (and for the checks the Hugging Face folder it came from).
Every forward goes through the runtime's own `edge_llm.runner.SharedRunner` (shared KV buffers
bound with IO binding, attention_mask from per-row lengths), so what is measured is what serves;
optimum graphs (concat KV cache) are timed on a plain session. `bench_*` give ms per forward;
`greedy_match` / `top1_agreement` compare with transformers. CLI: `python -m export.fuse_check --help`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_llm.bundle import load_bundle
from edge_llm.runner import RunnerOptions, SharedRunner


def shared_runner(bundle_dir: Path, threads: int = 2, spin: bool = True) -> SharedRunner:
    """The runtime's runner for a fused (shared-KV) bundle."""
    bundle = load_bundle(bundle_dir)
    if bundle.graph.kv_layout != "shared":
        raise ValueError(f"{bundle_dir}: kv_layout {bundle.graph.kv_layout!r}; a fused bundle is 'shared'")
    return SharedRunner(bundle, RunnerOptions(threads=threads, spin=spin))


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


def bench_fused(runner: SharedRunner, batch: int, seq: int, past: int, runs: int) -> tuple[float, float]:
    """One forward of `seq` tokens per row on top of `past` cached ones, repeated in place."""
    cache = runner.empty(batch, past + seq + 1)
    ids = np.random.default_rng(0).integers(0, runner.vocab, (batch, seq))

    def once() -> None:
        cache.lengths[:] = past
        runner.forward(ids, cache)

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


def greedy_match(hf_dir: Path, bundle: Path, prompt: str, steps: int) -> tuple[list[int], list[int]]:
    """Greedy continuation by transformers and by the fused bundle (prefill, then 1-token
    decode steps); returns (reference ids, bundle ids), prompt excluded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(prompt)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
    runner = shared_runner(bundle)
    cache = runner.empty(1, len(ids) + steps + 1)
    got: list[int] = []
    logits = runner.forward(np.array([ids]), cache)
    for _ in range(steps):
        got.append(int(logits[0].argmax()))
        logits = runner.forward(np.array([[got[-1]]]), cache)
    return ref[0, len(ids) :].tolist(), got


def top1_agreement(
    hf_dir: Path, models: dict[str, Path], text: str, window: int = 512, windows: int = 4
) -> dict[str, dict[str, float]]:
    """Teacher-forced windows of `text`: per bundle (logits "all" or "tail"), the share of
    positions whose argmax equals transformers', the max |logit diff|, and perplexity."""
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
        runner = shared_runner(path)
        got = [runner.forward(np.array([c]), runner.empty(1, window), all_logits=True)[0] for c in chunks]
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
    driver on that graph file; the others are fused bundle folders."""
    kw = session_kw or {}
    sessions: dict[str, Any] = {
        name: make_session(path, **kw)
        if name.startswith("optimum")
        else shared_runner(path, kw.get("threads", 2), kw.get("spin", True))
        for name, path in models.items()
    }
    table: dict[str, dict[str, float]] = {name: {} for name in models}
    for _ in range(rounds):
        for batch, seq in cases:
            for name, runner in sessions.items():
                if name.startswith("optimum"):
                    med, _ = bench_optimum(runner, batch, seq, past, runs)
                else:
                    med, _ = bench_fused(runner, batch, seq, past, runs)
                key = f"B{batch}xS{seq}"
                table[name][key] = min(table[name].get(key, float("inf")), med)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.fuse_check")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="ms per forward, fused graphs (and optimum) interleaved")
    b.add_argument("models", nargs="+", help="NAME=BUNDLE ('optimum*' NAME: a graph file)")
    b.add_argument("--cases", default="1x1,1x4,1x16,2x1,4x1,8x1", help="BATCHxSEQ list")
    b.add_argument("--past", type=int, default=128)
    b.add_argument("--runs", type=int, default=20)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--no-spin", action="store_true")
    c = sub.add_parser("check", help="greedy match and WikiText top-1 against transformers")
    c.add_argument("--hf", type=Path, required=True)
    c.add_argument("--last", nargs="+", default=[], help="NAME=BUNDLE: greedy decode check")
    c.add_argument("--all", nargs="+", default=[], help="NAME=BUNDLE (logits all/tail): top-1 check")
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
        kw = {"threads": args.threads, "spin": not args.no_spin}
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
