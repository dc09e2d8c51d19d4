"""8 concurrent streams against 1, paired, with every forward of the scheduler timed (issue 17 item 3).

Each round runs B = 1 and B = 8 back to back (order alternating) through a fresh scheduler, as
`edge-llm bench`'s concurrency rows do (`bench.concurrent_throughput`: B copies of the chat
prompt, 128 new tokens, prefill included), and records for each run how many prefill forwards
the scheduler made (and their shapes), their total time and the median decode step. The 8/1
ratio of each round, and their median, say whether batching reaches 4x; the forward log says
where the time went (prefill or decode steps).

    python benchmarks/concurrency_paired.py BUNDLE [--rounds 4] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm import bench  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/concurrency_paired")
    args = ap.parse_args(argv)
    engine = Engine.load(args.bundle, RunnerOptions(threads=args.threads, max_batch=8))
    ids = bench.prompts(engine)["short"]
    log: list[tuple[tuple[int, ...], float]] = []
    forward_rows = engine.runner.forward_rows

    def timed(tokens: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        out = forward_rows(tokens, *a, **k)
        log.append((tuple(tokens.shape), time.perf_counter() - t))
        return out

    engine.runner.forward_rows = timed  # type: ignore[method-assign]
    for size in (1, 8):  # warm-up
        bench.concurrent_throughput(engine, ids, size, min(16, args.new_tokens), f"warm{size}")
    runs: dict[int, list[dict[str, Any]]] = {1: [], 8: []}
    for r in range(args.rounds):
        for size in (1, 8) if r % 2 == 0 else (8, 1):
            log.clear()
            load = os.getloadavg()[0]
            tok_s = bench.concurrent_throughput(engine, ids, size, args.new_tokens, f"r{r}-{size}")
            prefill = [(shape, t) for shape, t in log if shape[1] > 1]
            decode = [t for shape, t in log if shape[1] == 1]
            runs[size].append(
                {
                    "tok_s": tok_s,
                    "prefill_forwards": len(prefill),
                    "prefill_shapes": [list(s) for s, _ in prefill],
                    "prefill_ms": 1e3 * sum(t for _, t in prefill),
                    "decode_steps": len(decode),
                    "decode_step_ms_median": 1e3 * statistics.median(decode),
                    "loadavg_1min": load,
                }
            )
            print(size, runs[size][-1], flush=True)
    ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(runs[1], runs[8], strict=True)]
    steps = [
        b["decode_step_ms_median"] / a["decode_step_ms_median"] for a, b in zip(runs[1], runs[8], strict=True)
    ]
    result = {
        "bundle": str(args.bundle),
        "runs": runs,
        "speedup_8_per_round": ratios,
        "step_ratio_8_per_round": steps,
    }
    result["speedup_8_median"] = statistics.median(ratios)
    result["cpu"] = bench.cpu_info()
    lines = [
        f"`{args.bundle.name}`, {args.threads} threads, {len(ids)}-token prompt, "
        f"{args.new_tokens} new tokens.",
        "",
        "| round | 1 stream tok/s | 8 streams tok/s | 8/1 | prefill forwards (8) | decode step ms 1 / 8 "
        "| load |",
        "|---:|---:|---:|---:|---|---|---:|",
    ]
    for r, (a, b) in enumerate(zip(runs[1], runs[8], strict=True)):
        lines.append(
            f"| {r} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {ratios[r]:.2f} | {b['prefill_forwards']} "
            f"{b['prefill_shapes']} | {a['decode_step_ms_median']:.1f} / {b['decode_step_ms_median']:.1f} "
            f"| {b['loadavg_1min']:.1f} |"
        )
    lines.append(f"\nMedian 8/1: {result['speedup_8_median']:.2f}")
    write_results(args.out, result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
