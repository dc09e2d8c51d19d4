"""Where a decode step's time goes, by operator, at batch 1 and batch 8 (issue 17 item 3).

onnxruntime's own profiler (`SessionOptions.enable_profiling`) on the runtime's runner: each
batch size gets a session on the bundle's graph, a cache of `--past` tokens per row, and
`--steps` decode steps (each row one token; the cache length is reset so every step sees the same
past). Per operator type: milliseconds per step at B = 1 and B = 8 and their ratio, so the table
says which kernels grow with the rows of a step and which are paid once per step.

`--shapes` also times whole forwards of those shapes (rows x new tokens, default 1x1, 8x1, 8x2,
8x4, 1x21) in interleaved rounds (median over rounds of the best of 5): what folding a prompt
into a batch-8 step costs (8x2, 8x4: two or four tokens per row, padding included) against
prefilling it alone (1x21) — the figures behind edge_llm/batching.py's defaults. `--clock cpu`
times them in the calling thread's CPU time with one intra-op thread and no spinning (ORT runs
every kernel on the calling thread): on a host loaded by other jobs the wall clock swings by 2x
between runs, CPU time less (it still counts the stalls on caches and memory that neighbours
share). `--against B2 ...` times other bundles' shapes in the same rounds (each round every
bundle, order alternating), one column pair per bundle.

    python benchmarks/step_profile.py BUNDLE [--past 64] [--steps 20] [--graph portable|ragged]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.bundle import load_bundle  # noqa: E402
from edge_llm.runner import RunnerOptions, SharedRunner, session_options  # noqa: E402


def profile(bundle: Any, rows: int, past: int, steps: int, options: RunnerOptions) -> dict[str, Any]:
    """{op type: ms per step} and the median step (model_run) ms for `rows` rows."""
    import onnxruntime as ort

    runner = SharedRunner(bundle, options)
    so = session_options(options, prefused=True)
    so.enable_profiling = True
    so.profile_file_prefix = f"/tmp/edge-llm-step-profile-{os.getpid()}-{rows}"
    runner.session = ort.InferenceSession(
        str(runner.session_file), sess_options=so, providers=["CPUExecutionProvider"]
    )
    cache = runner.empty(rows, past + 8)
    runner.forward_rows(np.full((rows, past), 7, np.int64), cache, 0)
    for _ in range(steps):
        runner.forward_rows(np.full((rows, 1), 5, np.int64), cache, 0)
        cache.lengths[:] -= 1
    path = runner.session.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink()
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]
    ops: dict[str, float] = defaultdict(float)
    skip = True  # the first run is the prefill: its nodes come before the second model_run
    for e in events:
        if e.get("cat") == "Session" and e["name"] == "model_run":
            skip = False
        elif not skip and e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ops[e["args"]["op_name"]] += e["dur"] / 1e3 / max(len(runs), 1)
    return {"ops": dict(ops), "step_ms": statistics.median(runs) / 1e3 if runs else 0.0}


def shape_times(
    bundle: Any,
    options: RunnerOptions,
    shapes: list[tuple[int, int]],
    past: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """ms per forward of each (rows, tokens) shape over a past of `past`, per round (best of 5)."""
    runner = SharedRunner(bundle, options)
    if not runner.ragged and any(r > 1 and s > 1 for r, s in shapes):
        raise SystemExit("several tokens per row over a past need the query_seqlens graph (--graph ragged)")
    rows = max(r for r, _ in shapes)
    cache = runner.empty(rows, past + max(s for _, s in shapes) + 1)
    runner.forward_rows(np.full((rows, past), 7, np.int64), cache, 0)
    out: dict[str, list[float]] = {f"{r}x{s}": [] for r, s in shapes}
    for k in range(rounds):
        for r, s in shapes if k % 2 == 0 else shapes[::-1]:
            best = float("inf")
            for _ in range(5):
                t = clock()
                runner.forward_rows(np.full((r, s), 5, np.int64), cache, 0)
                best = min(best, clock() - t)
                cache.lengths[:r] -= s
            out[f"{r}x{s}"].append(1e3 * best)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graph", choices=("portable", "ragged"), default="portable")
    ap.add_argument("--shapes", default="", help="also time forwards: e.g. 1x1,8x1,8x2,8x4,1x21")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --shapes")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="--shapes: cpu = 1 thread's CPU time"
    )
    ap.add_argument(
        "--against",
        type=Path,
        nargs="*",
        default=[],
        help="--shapes: also these bundles, interleaved by round",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_profile")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    options = RunnerOptions(threads=args.threads, max_batch=8, ragged=args.graph == "ragged")
    load = os.getloadavg()[0]
    one, eight = (profile(bundle, rows, args.past, args.steps, options) for rows in (1, 8))
    result = {"bundle": str(args.bundle), "past": args.past, "steps": args.steps, "graph": args.graph}
    result |= {"b1": one, "b8": eight, "loadavg_1min_start": load, "loadavg_1min_end": os.getloadavg()[0]}
    total1, total8 = sum(one["ops"].values()), sum(eight["ops"].values())
    lines = [
        f"`{args.bundle.name}` ({args.graph} graph), {args.threads} threads, decode steps over a past of "
        f"{args.past}; onnxruntime profiler, ms per step "
        f"(load {load:.1f} -> {result['loadavg_1min_end']:.1f}).",
        "",
        "| op | B=1 ms | B=8 ms | 8/1 | share of B=8 |",
        "|---|---:|---:|---:|---:|",
    ]
    for op in sorted(eight["ops"], key=lambda k: -eight["ops"][k]):
        a, b = one["ops"].get(op, 0.0), eight["ops"][op]
        if b < 0.005 * total8:
            continue
        lines.append(f"| {op} | {a:.2f} | {b:.2f} | {b / a if a else 0:.2f} | {100 * b / total8:.0f}% |")
    lines.append(f"| all kernels | {total1:.2f} | {total8:.2f} | {total8 / total1:.2f} | 100% |")
    lines.append(
        f"| step (model_run, median) | {one['step_ms']:.2f} | {eight['step_ms']:.2f} | "
        f"{eight['step_ms'] / one['step_ms']:.2f} | |"
    )
    if args.shapes:
        shapes = [(int(a), int(b)) for a, b in (x.split("x") for x in args.shapes.split(","))]
        run_opts = replace(options, threads=1, spin=False) if args.clock == "cpu" else options
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        others = [load_bundle(b) for b in args.against]
        if not others:
            times = shape_times(bundle, run_opts, shapes, args.past, args.rounds, clock)
            per_bundle = [times]
        else:  # round by round, every bundle's shapes before the next round of any (order alternating)
            per_bundle = [{f"{r}x{s}": [] for r, s in shapes} for _ in range(1 + len(others))]
            for k in range(args.rounds):
                order = list(enumerate([bundle, *others]))
                for i, b in order if k % 2 == 0 else order[::-1]:
                    for key, v in shape_times(b, run_opts, shapes, args.past, 1, clock).items():
                        per_bundle[i][key] += v
            times = per_bundle[0]
            result["against"] = {str(b): t for b, t in zip(args.against, per_bundle[1:], strict=True)}
        result["shapes_ms"], result["shapes_clock"] = times, args.clock
        lines += [
            "",
            f"Whole forwards over a past of {args.past}, median of {args.rounds} interleaved rounds"
            + (" (CPU time of 1 thread):" if args.clock == "cpu" else ":"),
            "",
        ]
        names = [args.bundle.name, *(b.name for b in args.against)]
        lines += [
            "| rows x tokens | " + " | ".join(f"{n} ms | vs first" for n in names) + " |",
            "|---|" + "---:|---:|" * len(names),
        ]
        first = f"{shapes[0][0]}x{shapes[0][1]}"
        for key in times:
            cells = []
            for t in per_bundle:
                ms = statistics.median(t[key])
                cells.append(f"{ms:.2f} | {ms / statistics.median(t[first]):.2f}")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    write_results(args.out, result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
