"""8 concurrent streams against 1, paired, with every forward of the scheduler timed (issue 17 item 3).

Each round runs B = 1 and B = 8 back to back (order alternating) through a fresh scheduler, as
`edge-llm bench`'s concurrency rows do (`bench.concurrent_throughput`: B copies of the chat
prompt, 128 new tokens, prefill included), and records for each run how many prefill forwards
the scheduler made (and their shapes), their total time, the decode forwards' total and median,
and the rest of the wall time (Python: scheduling, sampling, streaming; `other_ms`). The 8/1
ratio of each round, and their median, say whether batching reaches 4x; the split says where
the time went.

`--graphs portable,ragged` runs the same rounds on each of the bundle's graphs (interleaved: one
round is every graph's 1 and 8; `ragged` = the query_seqlens graph, onnxruntime >= 1.32).
`--stagger N` submits the 8 requests N decode steps apart instead of at once (mid-stream
arrivals: prefilled alone on the portable graph, folded into the decode step on the ragged one,
with `[runtime] fold_max` 64 there)
and also reports the median time to first token. `ragged:N` runs the ragged graph with a fold
padding budget of N token-rows per step (`[runtime] fold_padding`; 0: one prompt token per step, no
padding).

Several bundles (e.g. the same recipe exported two ways) run in the same interleaved rounds, each
on each graph of `--graphs` (labels `<folder>/<graph>`), and every label's 1- and 8-stream
throughput is also given as a ratio to the first label's, per round and as the median.

    python benchmarks/concurrency_paired.py BUNDLE [BUNDLE ...] [--rounds 4] [--new-tokens 128]
        [--graphs ragged]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm import bench  # noqa: E402
from edge_llm.bundle import load_bundle  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402


def staggered(
    engine: Engine, ids: list[int], clients: int, n_new: int, gap: int, tag: str
) -> tuple[float, float]:
    """(aggregate tok/s, median TTFT s) of `clients` requests, each submitted `gap` decode steps
    after the previous one, to a fresh scheduler."""
    from edge_llm.protocol import Request
    from edge_llm.scheduler import Scheduler

    text = engine.tokenizer.decode(ids, skip_special=False)
    sched = Scheduler(engine, max_queue=clients, max_inflight_per_client=clients, max_batch=clients)
    finals: list[Any] = []
    done = threading.Semaphore(0)

    def sink(event: Any) -> None:
        if event.done:
            finals.append(event)
            done.release()

    t0 = time.perf_counter()
    sched.start()
    for i in range(clients):
        if i:
            target = sched.stats["batch_steps"] + gap
            while sched.stats["batch_steps"] < target and len(finals) < i:
                time.sleep(0.001)
        sched.submit(Request(id=f"{tag}-{i}", prompt=text, max_tokens=n_new, ignore_eos=True), sink)
    for _ in range(clients):
        done.acquire()
    elapsed = time.perf_counter() - t0
    sched.close(grace_s=1)
    ttft = statistics.median(e.usage["ttft_s"] + e.usage["queue_s"] for e in finals)
    return clients * n_new / elapsed, ttft


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", type=Path, nargs="+", metavar="bundle")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--graphs", default="auto", help="comma list of portable, ragged (auto: what loads by default)"
    )
    ap.add_argument("--stagger", type=int, default=0, help="decode steps between arrivals (0: all at once)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/concurrency_paired")
    args = ap.parse_args(argv)
    args.bundle = args.bundles[0]
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    if not graphs or any(g.split(":")[0] not in ("portable", "ragged", "auto") for g in graphs):
        raise SystemExit("--graphs: a comma list of portable, ragged, ragged:PADDING (or auto)")
    if len({p.name for p in args.bundles}) < len(args.bundles):
        raise SystemExit("bundles: give folders of different names (they label the results)")
    engines = {}
    for path in args.bundles:
        bundle = load_bundle(path)
        for g in graphs:
            ragged = g != "portable"  # the ragged graph with folding on (prompts up to 64 tokens)
            padding = int(g.split(":")[1]) if ":" in g else 0  # the fold's padding budget
            options = RunnerOptions(
                threads=args.threads, max_batch=8, ragged=ragged, fold_max=64 if ragged else 0,
                fold_padding=padding,
            )  # fmt: skip
            engine = Engine(bundle, options)
            label = "ragged" if engine.runner.ragged else "portable"
            if ":" in g and label == "ragged":
                label = g
            if g.startswith("ragged") and not engine.runner.ragged:
                raise SystemExit(
                    f"{path}: no query_seqlens graph this onnxruntime runs ([fuse] query_seqlens)"
                )
            engines[f"{path.name}/{label}" if len(args.bundles) > 1 else label] = engine
    graphs = list(engines)
    ids = bench.prompts(engines[graphs[0]])["short"]
    log: list[tuple[tuple[int, ...], float]] = []

    def timed(engine: Engine) -> None:
        forward_rows = engine.runner.forward_rows

        def wrapper(tokens: Any, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = forward_rows(tokens, *a, **k)
            log.append((tuple(tokens.shape), time.perf_counter() - t))
            return out

        engine.runner.forward_rows = wrapper  # type: ignore[method-assign]

    for g, engine in engines.items():
        timed(engine)
        for size in (1, 8):  # warm-up
            bench.concurrent_throughput(engine, ids, size, min(16, args.new_tokens), f"warm{g}{size}")
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {g: {1: [], 8: []} for g in graphs}
    for r in range(args.rounds):
        order = [(g, s) for g in graphs for s in (1, 8)]
        for g, size in order if r % 2 == 0 else order[::-1]:
            engine = engines[g]
            log.clear()
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            ttft = None
            if args.stagger and size > 1:
                tok_s, ttft = staggered(engine, ids, size, args.new_tokens, args.stagger, f"r{r}{g}{size}")
            else:
                tok_s = bench.concurrent_throughput(engine, ids, size, args.new_tokens, f"r{r}{g}{size}")
            wall = time.perf_counter() - t0
            # A forward feeding more than one token per row somewhere is a prefill (alone or
            # folded into a decode step); one token per row is a decode step.
            prefill = [(shape, t) for shape, t in log if shape[1] > 1]
            decode = [t for shape, t in log if shape[1] == 1]
            forwards = sum(t for _, t in log)
            runs[g][size].append(
                {
                    "tok_s": tok_s,
                    "ttft_s_median": ttft,
                    "prefill_forwards": len(prefill),
                    "prefill_shapes": [list(s) for s, _ in prefill],
                    "prefill_ms": 1e3 * sum(t for _, t in prefill),
                    "decode_steps": len(decode),
                    "decode_ms": 1e3 * sum(decode),
                    "decode_step_ms_median": 1e3 * statistics.median(decode) if decode else 0.0,
                    "other_ms": 1e3 * (wall - forwards),
                    "wall_ms": 1e3 * wall,
                    "loadavg_1min": load,
                }
            )
            print(g, size, runs[g][size][-1], flush=True)
    result: dict[str, Any] = {
        "bundle": str(args.bundle),
        "bundles": [str(p) for p in args.bundles],
        "graphs": graphs,
        "stagger": args.stagger,
        "runs": runs,
    }
    for g in graphs:
        one, eight = runs[g][1], runs[g][8]
        ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(one, eight, strict=True)]
        steps = [
            b["decode_step_ms_median"] / a["decode_step_ms_median"] for a, b in zip(one, eight, strict=True)
        ]
        result[g] = {
            "speedup_8_per_round": ratios,
            "speedup_8_median": statistics.median(ratios),
            "step_ratio_8_per_round": steps,
        }
    first = graphs[0]
    # Each label against the first, round by round (the same round ran both, interleaved).
    result["vs_first"] = {
        g: {
            f"tok_s_{size}_ratio_per_round": [
                b["tok_s"] / a["tok_s"] for a, b in zip(runs[first][size], runs[g][size], strict=True)
            ]
            for size in (1, 8)
        }
        for g in graphs[1:]
    }
    for ratios in result["vs_first"].values():
        for size in (1, 8):
            ratios[f"tok_s_{size}_ratio_median"] = statistics.median(ratios[f"tok_s_{size}_ratio_per_round"])
    # kept at the top level for readers of earlier results (the first graph's figures)
    result["speedup_8_median"] = result[first]["speedup_8_median"]
    result["speedup_8_per_round"] = result[first]["speedup_8_per_round"]
    result["cpu"] = bench.cpu_info()
    arrive = f"arriving {args.stagger} decode steps apart" if args.stagger else "submitted at once"
    lines = [
        f"{', '.join(f'`{p.name}`' for p in args.bundles)}, {args.threads} threads, "
        f"{len(ids)}-token prompt, {args.new_tokens} new "
        f"tokens, 8 requests {arrive}; graphs: {', '.join(graphs)}.",
        "",
        "| round | graph | 1 stream tok/s | 8 streams tok/s | 8/1 | prefill forwards (8) "
        "| prefill / decode / other ms (8) | decode step ms 1 / 8 |"
        + (" TTFT s (8) |" if args.stagger else "")
        + " load |",
        "|---:|---|---:|---:|---:|---|---|---|" + ("---:|" if args.stagger else "") + "---:|",
    ]
    for r in range(args.rounds):
        for g in graphs:
            a, b = runs[g][1][r], runs[g][8][r]
            shapes = b["prefill_shapes"]
            shown = str(shapes) if len(shapes) <= 3 else f"{shapes[:2]} ... ({len(shapes)})"
            ratio = result[g]["speedup_8_per_round"][r]
            lines.append(
                f"| {r} | {g} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {ratio:.2f} "
                f"| {b['prefill_forwards']} {shown} | {b['prefill_ms']:.0f} / {b['decode_ms']:.0f} / "
                f"{b['other_ms']:.0f} | {a['decode_step_ms_median']:.1f} / {b['decode_step_ms_median']:.1f} |"
                + (f" {b['ttft_s_median']:.2f} |" if args.stagger else "")
                + f" {b['loadavg_1min']:.1f} |"
            )
    lines.append("")
    for g in graphs:
        lines.append(f"Median 8/1 ({g}): {result[g]['speedup_8_median']:.2f}")
    for g, ratios in result["vs_first"].items():
        lines.append(
            f"{g} / {first}: 1 stream x{ratios['tok_s_1_ratio_median']:.3f}, 8 streams "
            f"x{ratios['tok_s_8_ratio_median']:.3f} (medians of per-round ratios; 8 streams per round "
            + " / ".join(f"{x:.2f}" for x in ratios["tok_s_8_ratio_per_round"])
            + ")"
        )
    write_results(args.out, result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
