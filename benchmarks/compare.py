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
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm import bench  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402


def interleaved(
    bundles: list[Path],
    rounds: int,
    new_tokens: int,
    threads: int,
    pad_decode: bool = False,
    portable: bool = False,
    ragged: bool = False,
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
        print(
            f"{label:40s} {statistics.median(s):7.1f} tok/s  x{statistics.median(ratios):.3f}"
            f"  (x{statistics.median(same):.3f} of the first bundle in this mode)",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pad-decode", action="store_true", help="also run each bundle with pad_decode")
    ap.add_argument("--portable", action="store_true", help="also run each bundle on its portable graph")
    ap.add_argument("--ragged", action="store_true", help="also run each bundle with max_batch 2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare"))
    args = ap.parse_args()
    if len(args.bundles) < 2 and not (args.pad_decode or args.portable or args.ragged):
        ap.error(
            "give at least two bundles (the first is the reference), or --pad-decode / --portable / --ragged"
        )
    load = [os.getloadavg()[0]]
    rows = interleaved(
        args.bundles, args.rounds, args.new_tokens, args.threads, args.pad_decode, args.portable, args.ragged
    )
    load.append(os.getloadavg()[0])
    doc = {
        "onnxruntime": ort.__version__,
        "load_average_start_end": load,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
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
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
