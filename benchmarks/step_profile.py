"""Where a decode step's time goes, by operator, at batch 1 and batch 8 (issue 17 item 3).

onnxruntime's own profiler (`SessionOptions.enable_profiling`) on the runtime's runner: each
batch size gets a session on the bundle's graph, a cache of `--past` tokens per row, and
`--steps` decode steps (each row one token; the cache length is reset so every step sees the same
past). Per operator type: milliseconds per step at B = 1 and B = 8 and their ratio, so the table
says which kernels grow with the rows of a step and which are paid once per step.

    python benchmarks/step_profile.py BUNDLE [--past 64] [--steps 20] [--graph portable|ragged]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graph", choices=("portable", "ragged"), default="portable")
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
    write_results(args.out, result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
