"""Speculative decoding with the bundle's trained draft vs plain decoding, interleaved in one run.

In: a bundle with a draft (configs/recipes/smollm2-int8-draft.toml). Out, printed and written to
`benchmarks/results/speculation.{json,md}`:
  - per chat prompt: greedy decode tok/s with the draft and plain (speculation off), the median
    of the per-round ratios, and whether both gave the same tokens (they must);
  - acceptance (mean draft tokens kept per verify, drafted/accepted) on those chat prompts and
    on continuations of WikiText-2 valid's first 10% (text the draft never trained on);
  - draft cost: one draft step vs one main-graph decode step (1 token, ~300 cached), interleaved;
  - bundle size, and the draft's bytes in it.

Why interleaved: on a shared VM absolute speed drifts by tens of percent over minutes; here round
r of both modes runs before round r+1 of either, and ratios are medians of per-round ratios.

    python benchmarks/speculation.py BUNDLE [--rounds 5] [--new-tokens 128] [--text WIKITEXT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.engine import Engine, Slot  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402
from edge_llm.sampling import SamplingParams  # noqa: E402
from edge_llm.speculate import DraftKV  # noqa: E402

CHATS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator keeps food cold.",
    "What are three tips for staying focused while studying?",
]


def run(engine: Engine, ids: list[int], new: int) -> tuple[float, tuple[int, ...], dict]:
    """(decode tok/s after the first token, tokens, usage) of one greedy request."""
    gen = engine.start(ids, SamplingParams(max_tokens=new, ignore_eos=True))
    t1 = time.perf_counter()
    while not gen.finished:
        engine.step([gen])
    t2 = time.perf_counter()
    final = gen.final()
    assert final.usage is not None
    return (len(gen.generated) - 1) / (t2 - t1), final.token_ids, final.usage.as_dict()


def acceptance(usages: list[dict]) -> dict:
    drafted = sum(u["draft_tokens"] for u in usages)
    kept = sum(u["accepted_draft_tokens"] for u in usages)
    verifies = sum(u["draft_verifies"] for u in usages)
    return {
        "drafted": drafted,
        "accepted": kept,
        "verifies": verifies,
        "accepted_per_verify": kept / verifies if verifies else 0.0,
        "acceptance_rate": kept / drafted if drafted else 0.0,
    }


def draft_cost(spec: Engine, plain: Engine, ids: list[int], steps: int) -> dict:
    """Seconds per draft step and per main decode step (1 token after the prompt), interleaved
    in blocks of 8, and their ratio."""
    assert spec.draft is not None
    slot = Slot()
    logits, _ = plain.prefill(ids, slot)
    token = int(np.argmax(logits))
    spec.prefill(ids, Slot())
    hidden = spec.runner.hidden[0, -1].copy()
    draft = spec.draft
    kv = DraftKV(draft.width) if draft.stateful else None
    if kv is not None:  # an eagle1 draft's history: 64 real pairs, as 64 tokens into an answer
        draft.step(kv, np.repeat(hidden[None], 64, 0), [token] * 64, commit=True)
    draft_s, main_s = [], []
    verify_s: dict[int, list[float]] = {k: [] for k in (1, 2, 3, 4, 6)}
    cached = len(slot.ids)
    for _ in range(steps // 8):
        t = time.perf_counter()
        state = hidden
        for i in range(8):
            if kv is None:
                state, _ = draft(state, token)
            else:  # the first draft step reads the real history, the next ones its own guesses
                state, _ = draft.step(kv, state[None], [token], commit=i == 0)
        if kv is not None:
            kv.fed -= 1  # the next block's first step stands where this one's did
        draft_s.append((time.perf_counter() - t) / 8)
        t = time.perf_counter()
        for _ in range(8):
            plain.decode_one_token(token, slot)
        main_s.append((time.perf_counter() - t) / 8)
        plain.runner.truncate(slot.cache, cached)
        slot.ids = slot.ids[:cached]
        for k, times in verify_s.items():  # a verify of k drafts: one forward of k+1 tokens
            t = time.perf_counter()
            plain.runner.forward(np.full((1, k + 1), token, np.int64), slot.cache, all_logits=True)
            times.append(time.perf_counter() - t)
            plain.runner.truncate(slot.cache, cached)
    d, m = statistics.median(draft_s), statistics.median(main_s)
    verify = {str(k): statistics.median(v) / m for k, v in verify_s.items()}
    return {
        "draft_step_ms": d * 1e3,
        "main_step_ms": m * 1e3,
        "draft_over_main": d / m,
        "verify_over_main": verify,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=6)
    ap.add_argument("--text", type=Path, default=Path("/work/shared/data/wikitext-2/valid.txt"))
    ap.add_argument("--text-prompts", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculation"))
    args = ap.parse_args()
    opts = RunnerOptions(threads=args.threads, max_batch=1, draft_tokens=args.draft_tokens)
    plain = Engine.load(args.bundle, RunnerOptions(**{**opts.__dict__, "speculation": "off"}))
    spec = Engine.load(args.bundle, RunnerOptions(**{**opts.__dict__, "speculation": "draft"}))
    prompts = [spec.encode_request(messages=[{"role": "user", "content": c}]) for c in CHATS]
    for ids in prompts:  # warm-up: first-run allocations, page faults, bindings per width
        run(plain, ids, 16)
        run(spec, ids, 16)
    rows = []
    for c, ids in zip(CHATS, prompts, strict=True):
        on_s, off_s, usages, same = [], [], [], True
        for _ in range(args.rounds):
            a, toks_on, usage = run(spec, ids, args.new_tokens)
            b, toks_off, _ = run(plain, ids, args.new_tokens)
            on_s.append(a)
            off_s.append(b)
            usages.append(usage)
            same &= toks_on == toks_off
        ratio = statistics.median(x / y for x, y in zip(on_s, off_s, strict=True))
        row = {
            "prompt": c,
            "draft_tok_s": statistics.median(on_s),
            "plain_tok_s": statistics.median(off_s),
            "ratio": ratio,
            "identical": same,
            "text": spec.tokenizer.decode(list(toks_on))[:300],
            "first_difference": next(
                (i for i, (x, y) in enumerate(zip(toks_on, toks_off, strict=True)) if x != y), None
            ),
            "usages": usages,
            **acceptance(usages),
        }
        rows.append(row)
        print(
            f"{c[:40]:42s} draft {row['draft_tok_s']:6.1f}  plain {row['plain_tok_s']:6.1f} tok/s  "
            f"x{ratio:.3f}  kept/verify {row['accepted_per_verify']:.2f}  identical {same}",
            flush=True,
        )
    text = args.text.read_text(encoding="utf-8")
    held = text[: len(text) // 10]  # WikiText-2 valid's first 10%: the draft trains on [0.1, 1.0)
    pieces = [p for p in held.split("\n") if len(p) > 400][: args.text_prompts]
    wiki = []
    for p in pieces:
        ids = spec.tokenizer.encode(p)[:96]
        wiki.append(run(spec, ids, 64)[2])
    wiki_acc = acceptance(wiki)
    print(f"WikiText-2 valid (first 10%): kept/verify {wiki_acc['accepted_per_verify']:.2f}")
    cost = draft_cost(spec, plain, prompts[0], 96)
    print(
        f"draft step {cost['draft_step_ms']:.2f} ms vs main decode step {cost['main_step_ms']:.2f} ms "
        f"= {cost['draft_over_main']:.3f}; verify of k drafts vs a main step: {cost['verify_over_main']}"
    )
    files = spec.bundle.files
    draft_file = spec.bundle.graph.draft.file if spec.bundle.graph.draft else ""
    size = {"bundle_bytes": spec.bundle.size_bytes(), "draft_bytes": files[draft_file]["bytes"]}
    size["growth"] = size["draft_bytes"] / (size["bundle_bytes"] - size["draft_bytes"])
    chat_acc = acceptance([u for r in rows for u in r["usages"]])
    doc = {
        "bundle": str(args.bundle),
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "draft_tokens": args.draft_tokens,
        "load_avg": os.getloadavg(),
        "chat": rows,
        "chat_acceptance": chat_acc,
        "wikitext_acceptance": wiki_acc,
        "draft_cost": cost,
        "size": size,
    }
    lines = [
        f"Speculative decoding with the trained draft vs plain, {args.rounds} interleaved rounds, "
        f"{args.new_tokens} new tokens (greedy), {args.threads} threads, draft_tokens {args.draft_tokens}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| chat prompt | draft tok/s | plain tok/s | x plain (median) | kept / verify | identical |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt']} | {r['draft_tok_s']:.1f} | {r['plain_tok_s']:.1f} | {r['ratio']:.3f} | "
            f"{r['accepted_per_verify']:.2f} | {r['identical']} |"
        )
    lines += [
        "",
        f"Acceptance (mean draft tokens kept per verify): chat {chat_acc['accepted_per_verify']:.2f} "
        f"({chat_acc['accepted']}/{chat_acc['drafted']} drafts kept), WikiText-2 valid first 10% "
        f"{wiki_acc['accepted_per_verify']:.2f} ({wiki_acc['accepted']}/{wiki_acc['drafted']}).",
        f"Draft cost: {cost['draft_step_ms']:.2f} ms per draft token vs {cost['main_step_ms']:.2f} ms per "
        f"main decode step = {cost['draft_over_main']:.3f}. A verify of k drafts (k+1 tokens) vs a main "
        "step: " + ", ".join(f"k={k} x{v:.2f}" for k, v in cost["verify_over_main"].items()) + ".",
        f"Bundle {size['bundle_bytes'] / 1e6:.1f} MB, of which draft {size['draft_bytes'] / 1e6:.1f} MB "
        f"(+{100 * size['growth']:.1f}%).",
    ]
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
