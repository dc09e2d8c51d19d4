"""Decode speed of several bundles, interleaved in one process, as ratios to the first.

In: two or more bundle folders (the first is the reference). Out: per bundle the median decode
tok/s (short chat prompt, 128 new tokens, greedy, EOS ignored, 2 threads) and its ratio to the
reference, printed and written to `benchmarks/results/compare.{json,md}`.

Why interleaved: on a shared VM the absolute speed drifts by tens of percent over minutes, so
bundles measured one after another can swap places. Here run r of every bundle happens before
run r+1 of any, and each ratio is the median of the per-round ratios.

    python benchmarks/compare.py UNPRUNED_BUNDLE PRUNED_BUNDLE [--rounds 9]
    python benchmarks/compare.py BUNDLE --pad-decode   # [runtime] pad_decode's cost
    python benchmarks/compare.py BUNDLE --portable     # query_seqlens graph vs the portable one
    python benchmarks/compare.py PLAIN PADDED --ragged  # + each on its query_seqlens graph (max_batch 2)
    python benchmarks/compare.py PLAIN PADDED --ragged --step-pairs 400   # + single steps, interleaved

`--step-pairs N` also times N single decode steps per row, every row's step before the next
step of any (the cache cut back to the prompt each time: the same past for every step): a drift
of the host's speed over seconds then hits all rows alike, which whole 128-token runs (tens of
seconds apart) do not get on a loaded VM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm import bench  # noqa: E402
from edge_llm.engine import Engine, Slot  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402


def interleaved(
    bundles: list[Path],
    rounds: int,
    new_tokens: int,
    threads: int,
    pad_decode: bool = False,
    portable: bool = False,
    ragged: bool = False,
    step_pairs: int = 0,
) -> list[dict]:
    """Per bundle: median decode tok/s and the median per-round ratio to the first bundle.
    `pad_decode`: each bundle also runs with [runtime] pad_decode (a row after its plain one);
    `portable`: also with [runtime] ragged = false (the graph without query_seqlens, which the
    runtime picks on an onnxruntime that lacks it; the default row runs what this one picks);
    `ragged`: also with max_batch 2 (a batching engine: the query_seqlens graph where this
    onnxruntime runs it). Each row also gets the median per-round ratio to the first bundle's row
    of the same mode."""
    modes = [{}] + ([{"pad_decode": True}] if pad_decode else []) + ([{"ragged": False}] if portable else [])
    modes += [{"max_batch": 2}] if ragged else []
    runs = [(b, m) for b in bundles for m in modes]
    engines = [Engine.load(b, RunnerOptions(**{"threads": threads, "max_batch": 1, **m})) for b, m in runs]
    labels = [b.name + "".join(f" +{k}={v}" for k, v in m.items()) for b, m in runs]
    for e, label in zip(engines, labels, strict=True):
        print(f"{label}: graph {e.runner.graph_name}", flush=True)
    # Each bundle encodes the prompt with its own tokenizer: a trimmed vocabulary has other ids.
    ids = [bench.prompts(e)["short"] for e in engines]
    for e, x in zip(engines, ids, strict=True):  # warm-up: first-run allocations, page faults
        bench.timed_generation(e, x, new_tokens)
    speeds: list[list[float]] = [[] for _ in engines]
    for _ in range(rounds):
        for i, e in enumerate(engines):
            ttft, total, _ = bench.timed_generation(e, ids[i], new_tokens)
            speeds[i].append((new_tokens - 1) / (total - ttft))
    steps = single_steps(engines, ids, step_pairs) if step_pairs else [[] for _ in engines]
    rows = []
    for i, ((b, m), label, e, s) in enumerate(zip(runs, labels, engines, speeds, strict=True)):
        ratios = [x / r for x, r in zip(s, speeds[0], strict=True)]
        same = [x / r for x, r in zip(s, speeds[i % len(modes)], strict=True)]  # first bundle, same mode
        rows.append(
            {
                "bundle": str(b),
                "label": label,
                "pad_decode": bool(m.get("pad_decode")),
                "graph": e.runner.graph_name,
                "decode_tok_s": statistics.median(s),
                "decode_runs": s,
                "ratio_to_first": statistics.median(ratios),
                "ratio_runs": ratios,
                "ratio_to_first_same_mode": statistics.median(same),
            }
        )
        if step_pairs:  # speed ratio per step pair: the first bundle's step time / this one's
            pairs = [r / x for x, r in zip(steps[i], steps[i % len(modes)], strict=True)]
            rows[-1] |= {
                "step_ms": 1e3 * statistics.median(steps[i]),
                "step_ratio_same_mode": statistics.median(pairs),
            }
        print(
            f"{label:40s} {statistics.median(s):7.1f} tok/s  x{statistics.median(ratios):.3f}"
            f"  (x{statistics.median(same):.3f} of the first bundle in this mode)",
            flush=True,
        )
    return rows


def single_steps(engines: list[Engine], ids: list[list[int]], count: int) -> list[list[float]]:
    """Seconds of `count` 1-token decode steps per engine, interleaved step by step, each over the
    prompt `ids[i]` (the cache is cut back to it before every step)."""
    slots = []
    for e, x in zip(engines, ids, strict=True):
        slot = Slot()
        e.prefill(x, slot)
        slots.append(slot)
    times: list[list[float]] = [[] for _ in engines]
    for n in range(count + 1):
        for i, (e, slot) in enumerate(zip(engines, slots, strict=True)):
            e.runner.truncate(slot.cache, len(ids[i]))
            del slot.ids[len(ids[i]) :]
            t = time.perf_counter()
            e.decode_one_token(5 + n % 7, slot)
            if n:  # the first step per engine warms its binding up
                times[i].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pad-decode", action="store_true", help="also run each bundle with pad_decode")
    ap.add_argument("--portable", action="store_true", help="also run each bundle on its portable graph")
    ap.add_argument("--ragged", action="store_true", help="also run each bundle with max_batch 2")
    ap.add_argument("--step-pairs", type=int, default=0, help="also time N single steps, interleaved")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare"))
    args = ap.parse_args()
    if len(args.bundles) < 2 and not (args.pad_decode or args.portable or args.ragged):
        ap.error(
            "give at least two bundles (the first is the reference), or --pad-decode / --portable / --ragged"
        )
    load = [os.getloadavg()[0]]
    rows = interleaved(
        args.bundles,
        args.rounds,
        args.new_tokens,
        args.threads,
        args.pad_decode,
        args.portable,
        args.ragged,
        args.step_pairs,
    )
    load.append(os.getloadavg()[0])
    doc = {
        "onnxruntime": ort.__version__,
        "load_average_start_end": load,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "step_pairs": args.step_pairs,
        "rows": rows,
    }
    lines = [
        f"Interleaved decode on onnxruntime {ort.__version__}, {args.rounds} rounds, "
        f"{args.new_tokens} new tokens, {args.threads} threads.",
        "",
        f"Load average (1 min) at the start {load[0]:.1f}, at the end {load[1]:.1f}.",
        "",
        "| bundle | graph | decode tok/s (median) | x first (median of per-round ratios) | x first, same mode"
        " |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['graph']} | {r['decode_tok_s']:.1f} | {r['ratio_to_first']:.3f} "
            f"| {r['ratio_to_first_same_mode']:.3f} |"
        )
    if args.step_pairs:
        lines += [
            "",
            f"Single decode steps, {args.step_pairs} per row, interleaved step by step:",
            "",
            "| bundle | ms per step (median) | speed x first bundle, same mode (median of per-step ratios) |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['label']} | {r['step_ms']:.2f} | {r['step_ratio_same_mode']:.3f} |" for r in rows]
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
