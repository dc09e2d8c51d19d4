"""What SmolLM2's weight GEMMs cost at M = 1, 2, 4, 8 rows, by weight format (issue 17: why a
batch-8 step costs ~2x a batch-1 step, and which format would make M = 2..8 cheap).

In: nothing but the shapes (hidden 576, qkv 960, MLP 1536 packed as gate_up 3072, vocabulary
49152, 30 layers: `--hidden/--qkv/--mlp/--vocab/--layers`). For each format one graph holds
every weight MatMul of the model — 30 x (qkv 576x960, o 576x576, gate_up 576x3072,
down 1536x576) + lm_head 576x49152, random weights (cost does not depend on their values), each
MatMul reading the same [M, 576] or [M, 1536] input — so a run streams the whole model's weights
as a decode step does (~140 MB at int8; the L3 cannot hold them between runs). Formats:

- `nbits8-bB-aL[-h0]`: MatMulNBits 8-bit, blocks of B along K, accuracy_level L, `-h0`: lm_head
  at level 0 (what the quantize stage writes, export/nbits.py `encode_int8`; the default recipe
  is `nbits8-b64-a4-h0`).
- `nbits4-bB-aL`: MatMulNBits 4-bit, symmetric (no quantize mode writes it; for the kernel's
  cost by M only).
- `dynamic` / `dynamic-rr`: the quantize stage's mode "dynamic" (onnxruntime's quantize_dynamic:
  int8 weights per output channel, uint8 activations quantized per tensor at run time;
  MatMulInteger, fused by ORT into DynamicQuantizeMatMul), full 8-bit / reduce_range weights.
- `fp32`: plain MatMul (4x the bytes; the reference).

All sessions live in one process and are timed interleaved: each round runs every (format, M)
`--reps` times and keeps the median and the best; the figures are the medians of those over
rounds (on a shared host the best is the steadier of the two). `--clock cpu` times the calling
thread's CPU time instead of the wall clock, with one intra-op thread (ORT then runs every kernel
on the calling thread) and no spinning: what the kernels cost in CPU, which other processes on a
loaded host move less than the wall clock (CPU time still counts stalls on the caches and memory
bus they share; the same format's M = 1 figure moved ~10% between runs here), where wall-clock
figures there swung by 2x between runs. onnxruntime's profiler
(one more session per format, run after the timed rounds) splits a run by GEMM shape. Out:
`benchmarks/results/gemm_shapes.{json,md}` (ms per run, ratio to M = 1, per-shape µs).

    python benchmarks/gemm_shapes.py [--formats nbits8-b64-a4,nbits8-b128-a4,dynamic] [--ms 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.runner import RunnerOptions, session_options  # noqa: E402

DEFAULT_FORMATS = "nbits8-b64-a4,nbits8-b32-a4,nbits8-b128-a4,nbits8-b256-a4,dynamic,dynamic-rr"


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """GEMM name -> (K, N), in the order one decoder layer runs them."""
    h = args.hidden
    return {"qkv": (h, args.qkv), "o": (h, h), "gate_up": (h, 2 * args.mlp), "down": (args.mlp, h)}


def gemm_list(args: argparse.Namespace) -> list[tuple[str, tuple[int, int]]]:
    """(node name, (K, N)) of every weight MatMul of the model, in run order."""
    gemms = [(f"L{i}_{n}", kn) for i in range(args.layers) for n, kn in shapes(args).items()]
    return [*gemms, ("lm_head", (args.hidden, args.vocab))]


def fp32_stack(args: argparse.Namespace, path: Path) -> None:
    """The fp32 graph: every weight MatMul of the model, each with its own [M, K] input (as in the
    decoder, where no two GEMMs of different layers read one activation: ORT's dynamic
    quantization would otherwise quantize a shared input once for all of them)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs = [], [], [], []
    for name, (k, n) in gemm_list(args):
        w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        inputs.append(helper.make_tensor_value_info(f"{name}_x", TensorProto.FLOAT, ["M", k]))
        nodes.append(helper.make_node("MatMul", [f"{name}_x", f"{name}_w"], [f"{name}_y"], name=name))
        outputs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(nodes, "gemm_stack", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # what onnxruntime 1.23.2 reads (the onnx package writes newer)
    from export.quantize import save

    save(model, path)


def build(fmt: str, fp32: Path, work: Path) -> Path:
    """The graph of format `fmt`, written from the fp32 stack the way the quantize stage does."""
    from export.quantize import QuantizeConfig
    from export.quantize import run as quantize

    if fmt == "fp32":
        return fp32
    if fmt.startswith("nbits8-"):
        _, b, a, *head = fmt.split("-")
        cfg = QuantizeConfig(
            mode="int8",
            block_size=int(b[1:]),
            accuracy_level=int(a[1:]),
            exact_activations=("lm_head",) if head == ["h0"] else (),
            embeddings="fp32",
        )
    elif fmt in ("dynamic", "dynamic-rr"):
        cfg = QuantizeConfig(mode="dynamic", reduce_range=fmt == "dynamic-rr")
    elif fmt.startswith("nbits4-"):
        return build_4bit(fmt, fp32, work)
    else:
        raise SystemExit(f"unknown format {fmt!r}")
    return quantize(cfg, fp32, work / fmt).model_path


def build_4bit(fmt: str, fp32: Path, work: Path) -> Path:
    """`nbits4-bB-aL`: MatMulNBits 4-bit, symmetric (absmax/7 per block, ORT's default zero point
    8). No quantize mode writes it (its error is ~8x int8's); here for the kernel's cost by M."""
    import onnx

    from export import nbits
    from export.quantize import save

    _, b, a = fmt.split("-")
    block = int(b[1:])

    def encode(w: np.ndarray) -> nbits.NBitsWeight:
        blocks = nbits._blocks(w, block)
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / 7.0
        scale[scale == 0] = 1.0
        codes = (np.clip(np.rint(blocks / scale), -8, 7) + 8).astype(np.uint8)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        return nbits.NBitsWeight(4, block, *w.shape, packed, scale.reshape(-1), None, None)

    model = onnx.load(str(fp32))
    nbits.rewrite_matmuls(model, encode, int(a[1:]))
    out = work / fmt / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    save(model, out)
    return out


def feeds(args: argparse.Namespace, m: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(m)
    xs = {k: rng.standard_normal((m, k), dtype=np.float32) for k in {k for _, (k, _) in gemm_list(args)}}
    return {f"{name}_x": xs[k] for name, (k, _) in gemm_list(args)}


def gemm_of(event: dict[str, Any], by_kn: dict[tuple[int, int], str]) -> str:
    """Which GEMM shape a profiler node event belongs to (by its input K and output N)."""
    a = event.get("args", {})
    try:
        k = int(a["input_type_shape"][0][next(iter(a["input_type_shape"][0]))][-1])
        n = int(a["output_type_shape"][0][next(iter(a["output_type_shape"][0]))][-1])
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return "other"
    return by_kn.get((k, n), "other")


def profile(path: Path, args: argparse.Namespace, ms: list[int], prefix: str) -> dict[int, dict[str, float]]:
    """{M: {gemm shape: µs per run, summed over the layers}} from onnxruntime's profiler."""
    import onnxruntime as ort

    so = session_options(RunnerOptions(threads=args.threads, spin=args.clock == "wall"))
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    order: list[int] = []
    for m in ms:
        f = feeds(args, m)
        for _ in range(args.profile_runs):
            sess.run(None, f)
            order.append(m)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_kn = {kn: name for name, kn in shapes(args).items()} | {(args.hidden, args.vocab): "lm_head"}
    runs: list[list[dict[str, Any]]] = [[]]
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append([])
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            runs[-1].append(e)
    runs = runs[:-1][-len(order) :]
    # per node, the best of its runs at that M (a shared host preempts single kernels for
    # milliseconds), then summed by GEMM shape; the first run of each M (buffers) is left out
    best: dict[int, dict[str, float]] = defaultdict(dict)
    seen: set[int] = set()
    for m, run in zip(order, runs, strict=True):
        if m not in seen:
            seen.add(m)
            continue
        for e in run:
            best[m][e["name"]] = min(best[m].get(e["name"], float("inf")), e["dur"])
    kind = {e["name"]: gemm_of(e, by_kn) for run in runs for e in run}
    out: dict[int, dict[str, float]] = {}
    for m, nodes in best.items():
        out[m] = defaultdict(float)
        for name, us in nodes.items():
            out[m][kind[name]] += us
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default=DEFAULT_FORMATS)
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: 1 thread, its CPU time")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile-runs", type=int, default=12)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--qkv", type=int, default=960)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--work", type=Path, default=None, help="folder for the graphs (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gemm_shapes"))
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    kinds = [*shapes(args).values(), (args.hidden, args.vocab)]
    if len(set(kinds)) < len(kinds):  # the profiler's split goes by (K, N)
        raise SystemExit(f"two GEMMs share a shape (K, N) in {kinds}: the split by shape needs them apart")
    if args.clock == "cpu":
        args.threads = 1
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    options = RunnerOptions(threads=args.threads, spin=args.clock == "wall")
    ms = [int(m) for m in args.ms.split(",")]
    tmp = tempfile.TemporaryDirectory(dir=args.work)
    work = Path(tmp.name)
    fp32 = work / "fp32" / "model.onnx"
    fp32.parent.mkdir(parents=True)
    fp32_stack(args, fp32)
    paths = {f: build(f, fp32, work) for f in formats}
    sessions = {
        f: ort.InferenceSession(str(p), session_options(options), providers=["CPUExecutionProvider"])
        for f, p in paths.items()
    }
    feed = {m: feeds(args, m) for m in ms}
    for s in sessions.values():  # warm-up: weights prepacked, every M's buffers allocated
        for m in ms:
            s.run(None, feed[m])
    load = [os.getloadavg()[0]]
    times: dict[str, dict[int, list[float]]] = {f: {m: [] for m in ms} for f in formats}
    bests: dict[str, dict[int, list[float]]] = {f: {m: [] for m in ms} for f in formats}
    for r in range(args.rounds):
        for f, s in sessions.items():
            for m in ms:
                runs = []
                for _ in range(args.reps):
                    t = clock()
                    s.run(None, feed[m])
                    runs.append((clock() - t) * 1e3)
                times[f][m].append(statistics.median(runs))
                bests[f][m].append(min(runs))
        load.append(os.getloadavg()[0])
        print(f"round {r}: load {load[-1]:.2f}", flush=True)
    del sessions
    per_shape = {f: profile(p, args, ms, str(work / f"prof-{f}")) for f, p in paths.items()}
    tmp.cleanup()
    med = {f: {m: statistics.median(v) for m, v in d.items()} for f, d in times.items()}
    best = {f: {m: statistics.median(v) for m, v in d.items()} for f, d in bests.items()}
    base = formats[0]
    lines = [
        "# Weight GEMMs of SmolLM2 by format and rows (benchmarks/gemm_shapes.py)",
        "",
        f"onnxruntime {ort.__version__}, {args.threads} thread(s), {args.clock} clock, "
        f"{args.layers} layers + lm_head, "
        f"{args.rounds} interleaved rounds x {args.reps} runs, "
        f"load average {min(load):.2f}-{max(load):.2f}.",
    ]
    for title, fig in (("best of each round's runs", best), ("median of each round's runs", med)):
        lines += [
            "",
            f"## Whole model's weight GEMMs, ms per run ({title}; median over rounds)",
            "",
            "| format | "
            + " | ".join(f"M={m}" for m in ms)
            + " | "
            + " | ".join(f"{m}/1" for m in ms[1:])
            + f" | M={ms[0]} vs {base} | M={ms[-1]} vs {base} |",
            "|---|" + "---:|" * (2 * len(ms) - 1 + 2),
        ]
        for f in formats:
            row = [f"{fig[f][m]:.2f}" for m in ms] + [f"{fig[f][m] / fig[f][ms[0]]:.2f}" for m in ms[1:]]
            row += [f"{fig[f][ms[0]] / fig[base][ms[0]]:.2f}", f"{fig[f][ms[-1]] / fig[base][ms[-1]]:.2f}"]
            lines.append(f"| {f} | " + " | ".join(row) + " |")
    gemms = [*shapes(args), "lm_head", "other"]
    lines += ["", "## By GEMM shape (profiler: each node's best run, µs, summed over the layers)", ""]
    lines += ["| format | M | " + " | ".join(gemms) + " |", "|---|---:|" + "---:|" * len(gemms)]
    for f in formats:
        for m in ms:
            d = per_shape[f].get(m, {})
            lines.append(f"| {f} | {m} | " + " | ".join(f"{d.get(g, 0.0):.0f}" for g in gemms) + " |")
    doc = {
        "onnxruntime": ort.__version__,
        "args": vars(args) | {"work": str(args.work)},
        "load_average": load,
        "ms_per_run_median": times,
        "ms_per_run_best": bests,
        "median_ms": med,
        "best_ms": best,
        "per_shape_us": per_shape,
    }
    print("\n".join(lines))
    write_results(Path(args.out), doc, lines)
    return doc


if __name__ == "__main__":
    main()
