"""Where the batch-8 decode step goes: the attention op alone against the whole fused forward.

In: a fused (shared-KV) bundle, e.g. the default SmolLM2 one. Out: per batch size B and past
length L, the time of (a) one ORT GroupQueryAttention decode step with the bundle's head layout
(packed QKV, rotary, shared KV buffer), (b) the same attention written with standard ops
(MatMul / Softmax over the query heads of each KV group), and (c) one whole decode forward of the
bundle; printed and written to `benchmarks/results/attention_micro.{json,md}`.

Why: the continuous-batching target (8 streams >= 4x one) needs the B=8 forward <= 2x the B=1
one. If attention were most of the difference, another attention formulation would be the
lever; if not, it is the int8 GEMMs.

    python benchmarks/attention_micro.py BUNDLE [--threads 2] [--steps 400]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm import bench  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402


def gqa_graph(heads: int, kv: int, dim: int, cap: int) -> bytes:
    f = TensorProto.FLOAT
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "pk", "pv", "seqlens_k", "total", "cos", "sin"],
        ["out", "pk_out", "pv_out"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv,
        do_rotary=1,
    )
    kv_shape = ["B", kv, cap, dim]
    graph = helper.make_graph(
        [node],
        "gqa",
        [
            helper.make_tensor_value_info("qkv", f, ["B", 1, (heads + 2 * kv) * dim]),
            helper.make_tensor_value_info("pk", f, kv_shape),
            helper.make_tensor_value_info("pv", f, kv_shape),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
            helper.make_tensor_value_info("cos", f, [cap, dim // 2]),
            helper.make_tensor_value_info("sin", f, [cap, dim // 2]),
        ],
        [
            helper.make_tensor_value_info("out", f, ["B", 1, heads * dim]),
            helper.make_tensor_value_info("pk_out", f, kv_shape),
            helper.make_tensor_value_info("pv_out", f, kv_shape),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def matmul_graph(heads: int, kv: int, dim: int) -> bytes:
    """q [B, kv, heads/kv, d] · k [B, kv, L, d]^T -> softmax -> · v: one GEMM per KV group."""
    f, group = TensorProto.FLOAT, heads // kv
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mm",
        [
            helper.make_tensor_value_info("q", f, ["B", kv, group, dim]),
            helper.make_tensor_value_info("k", f, ["B", kv, "L", dim]),
            helper.make_tensor_value_info("v", f, ["B", kv, "L", dim]),
        ],
        [helper.make_tensor_value_info("o", f, ["B", kv, group, dim])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def timed(fn: object, steps: int) -> float:
    """Median of 5 rounds of `steps` calls, in microseconds per call."""
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            fn()  # type: ignore[operator]
        rounds.append((time.perf_counter() - t) / steps * 1e6)
    return float(np.median(rounds))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--pasts", default="64,256", help="past lengths, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/attention_micro"))
    args = ap.parse_args(argv)
    try:
        pasts = [int(n) for n in args.pasts.split(",")]
    except ValueError:
        ap.error(f"--pasts {args.pasts!r}: expected comma-separated integers")
    if not pasts or min(pasts) < 1:
        ap.error("--pasts: lengths must be >= 1")
    engine = Engine.load(args.bundle, RunnerOptions(threads=args.threads, max_batch=8))
    arch, runner = engine.bundle.architecture, engine.runner
    heads, kv, dim, layers = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.num_layers
    cap = 2048
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    gqa = ort.InferenceSession(gqa_graph(heads, kv, dim, cap), so)
    mm = ort.InferenceSession(matmul_graph(heads, kv, dim), so)
    rng = np.random.default_rng(0)
    cos = np.cos(rng.random((cap, dim // 2))).astype(np.float32)
    sin = np.sin(rng.random((cap, dim // 2))).astype(np.float32)
    rows = []
    for batch in (1, 8):
        for length in [n for n in pasts if n < runner.max_context]:
            pk = rng.random((batch, kv, cap, dim), dtype=np.float32)
            pv = pk.copy()
            b = gqa.io_binding()
            b.bind_cpu_input("qkv", rng.random((batch, 1, (heads + 2 * kv) * dim), dtype=np.float32))
            b.bind_cpu_input("seqlens_k", np.full(batch, length - 1, np.int32))
            b.bind_cpu_input("total", np.array(length, np.int32))
            b.bind_cpu_input("cos", cos)
            b.bind_cpu_input("sin", sin)
            for name, buf in (("pk", pk), ("pv", pv)):
                b.bind_input(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                b.bind_output(name + "_out", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            b.bind_output("out", "cpu")
            feeds = {
                "q": rng.random((batch, kv, heads // kv, dim), dtype=np.float32),
                "k": rng.random((batch, kv, length, dim), dtype=np.float32),
                "v": rng.random((batch, kv, length, dim), dtype=np.float32),
            }
            cache = runner.empty(batch)
            runner.forward_rows(np.full((batch, length), 7), cache, 0)
            step = np.full((batch, 1), 5)

            def forward(cache: object = cache, step: np.ndarray = step, batch: int = batch) -> None:
                runner.forward_rows(step, cache, 0)  # type: ignore[arg-type]
                cache.lengths[:batch] -= 1  # type: ignore[attr-defined]  # stay at `length`

            gqa_us = timed(lambda b=b: gqa.run_with_iobinding(b), args.steps)
            mm_us = timed(lambda feeds=feeds: mm.run(None, feeds), args.steps)
            fwd_us = timed(forward, max(20, args.steps // 10))
            rows.append(
                {
                    "batch": batch,
                    "past": length,
                    "gqa_us_per_layer": round(gqa_us, 1),
                    "matmul_attention_us_per_layer": round(mm_us, 1),
                    "gqa_ms_per_step": round(gqa_us * layers / 1e3, 2),
                    "forward_ms": round(fwd_us / 1e3, 2),
                }
            )
            print(rows[-1])
    lines = [
        f"Bundle `{engine.bundle.name}`: {layers} layers, {heads} query / {kv} KV heads of {dim}; "
        f"{args.threads} threads; medians of 5 rounds.",
        "",
        "| batch | past | GQA us/layer | MatMul attention us/layer | GQA ms/step (all layers) | forward ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['past']} | {r['gqa_us_per_layer']} | {r['matmul_attention_us_per_layer']} "
        f"| {r['gqa_ms_per_step']} | {r['forward_ms']} |"
        for r in rows
    ]
    write_results(Path(args.out), {"cpu": bench.cpu_info(), "threads": args.threads, "rows": rows}, lines)
    return rows


if __name__ == "__main__":
    main()
