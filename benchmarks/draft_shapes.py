"""What a draft step costs in ONNX Runtime, by draft vocabulary and MLP width, as a fraction of
the main graph's decode step — the measurement behind the draft's shape (export/train_draft.py).

In: a bundle (its main graph is the reference; its hidden size is used). For each shape a draft
with random weights is written and quantized exactly as the stage does (int8 MatMulNBits +
GatherBlockQuantized), and one draft step (1 row, one thread) is timed interleaved with the
main graph's one-token decode step (~100 cached tokens). Cost does not depend on the weights'
values, so random ones measure it. Out: `benchmarks/results/draft_shapes.{json,md}`.

    python benchmarks/draft_shapes.py BUNDLE [--vocabs 4096,8192,16384,49152] [--widths 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.engine import Engine, Slot  # noqa: E402
from edge_llm.runner import RunnerOptions, session_options  # noqa: E402


def main() -> None:
    import onnxruntime as ort

    from export.train_draft import make_head, quantize_draft, write_onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--vocabs", default="4096,8192,16384,49152")
    ap.add_argument("--widths", default="1024")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "draft_shapes"))
    args = ap.parse_args()
    main_engine = Engine.load(
        args.bundle, RunnerOptions(threads=args.threads, max_batch=1, speculation="off")
    )
    arch = main_engine.bundle.architecture
    slot = Slot()
    ids = main_engine.tokenizer.encode("The history of the region begins with " * 12)[:100]
    main_engine.prefill(ids, slot)
    rng = np.random.default_rng(0)
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in [int(v) for v in args.vocabs.split(",")]:
            for width in [int(w) for w in args.widths.split(",")]:
                table = rng.standard_normal((vocab + 1, arch.hidden_size)).astype(np.float32) * 0.02
                head = make_head(table, width, 1e-5)
                vmap = np.full(arch.vocab_size, vocab, np.int64)
                vmap[:vocab] = np.arange(vocab)
                fp32, out = Path(tmp) / f"d{vocab}-{width}.onnx", Path(tmp) / f"q{vocab}-{width}.onnx"
                write_onnx(head, vmap, 1e-5, fp32)
                quantize_draft(fp32, out, 64)
                so = session_options(RunnerOptions(threads=1))
                sessions[(vocab, width)] = (
                    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]),
                    out.stat().st_size,
                )
        feeds = {
            "hidden": rng.standard_normal((1, arch.hidden_size)).astype(np.float32),
            "input_ids": np.array([5]),
        }
        times: dict[tuple[int, int], list[float]] = {k: [] for k in sessions}
        main_t: list[float] = []
        cached = len(slot.ids)
        for _ in range(args.steps // 10):
            for key, (sess, _) in sessions.items():
                t = time.perf_counter()
                for _ in range(10):
                    sess.run(None, feeds)
                times[key].append((time.perf_counter() - t) / 10)
            t = time.perf_counter()
            for _ in range(10):
                main_engine.decode_one_token(5, slot)
            main_t.append((time.perf_counter() - t) / 10)
            main_engine.runner.truncate(slot.cache, cached)
            slot.ids = slot.ids[:cached]
    m = statistics.median(main_t)
    rows = [
        {
            "vocab": v,
            "width": w,
            "bytes": sessions[(v, w)][1],
            "step_ms": statistics.median(t) * 1e3,
            "fraction_of_main": statistics.median(t) / m,
        }
        for (v, w), t in times.items()
    ]
    load = os.getloadavg()[0]
    lines = [
        f"Draft step (1 row, 1 thread, int8) vs the main graph's decode step ({args.threads} threads, "
        f"{m * 1e3:.2f} ms), medians of {args.steps // 10} interleaved blocks of 10; "
        f"load average {load:.1f}.",
        "",
        "| draft vocab | MLP width | draft MB | ms / draft step | x main step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']} | {r['width']} | {r['bytes'] / 1e6:.1f} | {r['step_ms']:.3f} "
            f"| {r['fraction_of_main']:.3f} |"
        )
        print(lines[-1], flush=True)
    doc = {"bundle": str(args.bundle), "main_step_ms": m * 1e3, "load_avg": load, "rows": rows}
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
