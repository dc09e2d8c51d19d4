"""Is greedy speculation plain decoding, bit for bit? Logit gaps and end-to-end tokens per bundle.

In: one or more fused bundles (e.g. the default recipe exported without and with `[fuse]
pad_query_row`). Out, printed and written to `benchmarks/results/exact_decode.{json,md}`:
  - the largest |logit| difference between a greedy plain decode (1-token forwards) and verify
    forwards of k = 2, 4, 7 tokens over the same tokens from the same state, on the portable
    graph (max_batch 1: generate / chat) and on the query_seqlens graph (max_batch 2: serve, on
    onnxruntime >= 1.32);
  - per chat prompt: 128 greedy tokens with prompt-lookup speculation vs plain, identical or the
    index of the first token where they part, wherever speculation runs: alone on the portable
    graph (max_batch 1), alone on the query_seqlens graph (max_batch 2: serve with one request),
    and "batched": beside a second request for its first `--beside` tokens (default 32, at most
    half; batched steps, where no row speculates), then alone (`batched_then_alone`, what serve
    does with two requests).

No timing here (benchmarks/compare.py measures decode cost, interleaved).

    python benchmarks/exact_decode.py PLAIN_BUNDLE PADDED_BUNDLE [--new-tokens 128] [--prompt-lookup 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_llm.engine import Engine, Generation, Slot  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402
from edge_llm.sampling import SamplingParams  # noqa: E402


def greedy_decode(engine: Engine, ids: list[int], n: int) -> tuple[Slot, list[int], list[np.ndarray]]:
    """Prefill `ids`, then `n` greedy 1-token forwards: (the slot, the tokens fed, the logits of
    each forward)."""
    slot = Slot()
    logits, _ = engine.prefill(ids, slot)
    tokens, rows = [], []
    for _ in range(n):
        tokens.append(int(logits.argmax()))
        logits = engine.decode_one_token(tokens[-1], slot)
        rows.append(logits)
    return slot, tokens, rows


def decode_verify_gap(engine: Engine, steps: int = 14, ks: tuple[int, ...] = (2, 3, 7)) -> float:
    """Largest |logit| difference between `engine`'s greedy plain decode (1-token forwards) and
    verify forwards of k tokens over the same tokens from the same state: 0.0 where 1-token
    forwards take the verify's kernel path ([fuse] pad_query_row, [runtime] pad_decode)."""
    ids = engine.encode_request(prompt="The capital of France is")
    _, tokens, rows = greedy_decode(engine, ids, steps)
    gap = 0.0
    for k in ks:
        verify = Slot()
        engine.prefill(ids, verify)
        for start in range(0, steps - k + 1, k):
            chunk = np.array([tokens[start : start + k]], dtype=np.int64)
            got = engine._forward_slot(chunk, verify, all_logits=True)[0]
            gap = max(gap, max(float(np.abs(got[j] - rows[start + j]).max()) for j in range(k)))
    return gap


def batched_then_alone(engine: Engine, ids: list[int], params: SamplingParams, beside: int) -> Generation:
    """What serve does with two requests: `ids` in row 0 of a 2-row batch cache, beside a copy
    that stops after `beside` tokens. Both advance in batched steps (rows of a wider batch never
    speculate; the padded graph runs them unpadded), then row 0 runs alone (padded, and
    speculating where `engine` does). Returns row 0's generation."""
    cache = engine.batch_cache(2)
    both = (params, replace(params, max_tokens=beside))
    seqs = [Generation(engine, ids, p, engine.attach(Slot(), cache, row)) for row, p in enumerate(both)]
    engine.start_all(seqs)
    while not seqs[0].finished:
        engine.step([q for q in seqs if not q.finished])
    return seqs[0]


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    """Index of the first token where a and b part (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(
    bundle: Path, chats: list[str], new_tokens: int, lookup: int, threads: int, beside: int = 32
) -> dict:
    opts = {"threads": threads, "speculation": "off"}
    gaps = {}
    for rows, name in ((1, "portable"), (2, "ragged")):
        engine = Engine.load(bundle, RunnerOptions(**{**opts, "max_batch": rows}))
        gaps[name] = {
            "graph": engine.runner.graph_name,
            "max_abs_logit_gap": decode_verify_gap(engine, 24, (2, 4, 7)),
        }
        gap = gaps[name]["max_abs_logit_gap"]
        print(f"{bundle.name} {engine.runner.graph_name}: decode vs verify max |dlogit| {gap}", flush=True)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    runs = []
    for mode, rows in (("portable", 1), ("ragged", 2), ("batched", 2)):
        plain = Engine.load(bundle, RunnerOptions(**{**opts, "max_batch": rows}))
        spec_opts = {**opts, "max_batch": rows, "speculation": "lookup", "prompt_lookup": lookup}
        spec = Engine.load(bundle, RunnerOptions(**spec_opts))
        print(f"{bundle.name} {mode} ({spec.runner.graph_name}):", flush=True)
        for chat in chats:
            ids = plain.encode_request(messages=[{"role": "user", "content": chat}])
            if mode == "batched":
                a, b = (
                    batched_then_alone(e, ids, params, min(beside, new_tokens // 2)) for e in (spec, plain)
                )
                got, want, u = tuple(a.generated), tuple(b.generated), a
                drafts = (u.verifies, u.accepted, u.drafted)
            else:
                ca, cb = spec.complete(ids, params), plain.complete(ids, params)
                got, want, v = ca.token_ids, cb.token_ids, ca.usage
                drafts = (v.draft_verifies, v.accepted_draft_tokens, v.draft_tokens)
            part = first_difference(got, want)
            runs.append(
                {
                    "prompt": chat,
                    "mode": mode,
                    "graph": spec.runner.graph_name,
                    "identical": part is None,
                    "parts_at": part,
                    "draft_verifies": drafts[0],
                    "accepted_draft_tokens": drafts[1],
                    "draft_tokens": drafts[2],
                }
            )
            print(
                f"  {chat[:40]!r}: {'identical' if part is None else f'parts at token {part}'}"
                f" ({drafts[1]}/{drafts[2]} drafts kept, {drafts[0]} verifies)",
                flush=True,
            )
    return {"bundle": str(bundle), "kv_spare": plain.bundle.graph.kv_spare, "gaps": gaps, "chats": runs}


def main() -> None:
    import onnxruntime as ort

    from benchmarks.results_io import write_results
    from benchmarks.speculation import CHATS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-lookup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beside", type=int, default=32, help="batched mode: the second request's tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "exact_decode"))
    args = ap.parse_args()
    load = [os.getloadavg()[0]]
    rows = [
        measure(b, CHATS, args.new_tokens, args.prompt_lookup, args.threads, args.beside)
        for b in args.bundles
    ]
    load.append(os.getloadavg()[0])
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "onnxruntime": ort.__version__,
        "new_tokens": args.new_tokens,
        "prompt_lookup": args.prompt_lookup,
        "threads": args.threads,
        "load_average_start_end": load,
        "rows": rows,
    }
    lines = [
        f"{doc['date']}, onnxruntime {ort.__version__}, {args.threads} threads, load average "
        f"{load[0]:.1f} -> {load[1]:.1f}. Greedy, {args.new_tokens} new tokens, "
        f"prompt lookup k = {args.prompt_lookup}.",
        "",
        "| bundle | kv_spare | max \\|Δlogit\\| decode vs verify (portable / query_seqlens graph) | "
        "prompt lookup vs plain, per chat prompt (portable; ragged; batched then alone) |",
        "|---|---:|---|---|",
    ]
    for r in rows:
        gaps = " / ".join(f"{g['max_abs_logit_gap']:.3g} ({g['graph']})" for g in r["gaps"].values())
        chats = "; ".join(
            ", ".join(
                "identical" if c["identical"] else f"parts at {c['parts_at']}"
                for c in r["chats"]
                if c["mode"] == mode
            )
            for mode in ("portable", "ragged", "batched")
        )
        lines.append(f"| {Path(r['bundle']).name} | {r['kv_spare']} | {gaps} | {chats} |")
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
