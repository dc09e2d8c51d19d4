"""A compact KV cache on CPU: int8 K/V in GroupQueryAttention against the fp32 cache (issue 17 item 4).

What onnxruntime offers (read from the kernel registry of 1.32, `get_all_opkernel_def`): the CPU
GroupQueryAttention kernel takes a cache of float32 / int8 / uint8 with float32 q/k/v (T = float,
T_CACHE = float|int8|uint8) and static `k_scale` / `v_scale` inputs (PER_TENSOR or PER_CHANNEL,
`kv_cache_bit_width` 8 or 4); an fp16 cache needs fp16 q/k/v (T = float16), i.e. an fp16
activation path, which README measured slower on this CPU. So the compact variant measured here is
int8 K/V with per-channel scales (one per KV head and channel), calibrated offline.

A bundle exported with `[fuse] kv_cache = "both"` (export/variants.py) carries both caches: the
script compares them as a board profile would choose them (`[runtime] kv_cache`). For any other
fused bundle it builds the variant with the export stage's own functions: it runs the bundle on
calibration tokens, takes each layer's K and V absmax per (KV head, channel) from the cache buffers (K after
rotary, as the cache holds it), and rewrites the graph: the GQA nodes get scale initializers
(absmax / 127) and the quantization attributes, the KV inputs / outputs become int8. Weights are
shared (model.onnx.data is hard-linked where the file system allows, else copied). Then, paired
on the same host:

- KV bytes per token and per 2048-token row (from the buffers' dtypes),
- perplexity on WikiText (`export.evaluate.score`, context 512 and 2048) with each window fed in
  chunks of `--chunk` tokens, so attention reads the cache as decode does (a single prefill
  forward would read the fresh float K/V of the chunk itself and hide the cache's rounding),
- batch-1 and batch-8 decode step time at a past of 1024 (interleaved rounds, medians).

    python benchmarks/kv_cache.py BUNDLE [--out benchmarks/results/kv_cache] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402

WIKITEXT = Path(os.environ.get("EDGE_LLM_WIKITEXT", ROOT.parent / "shared/data/wikitext-2/valid.txt"))


def calibrate(engine: Engine, ids: np.ndarray, window: int) -> np.ndarray:
    """absmax [layers, 2 (K, V), kv heads, head_dim] of the cache over `ids`, in windows (the
    export stage's calibration, `export.variants.kv_absmax`, on the engine's graph)."""
    from export.variants import kv_absmax

    return kv_absmax(engine.runner.session_file, ids, window, engine.options.threads)


def write_int8_variant(bundle: Path, out: Path, absmax: np.ndarray, calib: dict[str, Any]) -> Path:
    """A copy of `bundle` whose GQA nodes keep an int8 cache with per-channel scales (for bundles
    exported without `[fuse] kv_cache`; the rewrite is the export stage's, `quantize_kv`)."""
    import onnx

    from export.onnx_graph import link_or_copy
    from export.variants import quantize_kv

    meta = json.loads((bundle / "bundle.json").read_text())
    graph_file = meta["graph"]["file"]
    model = onnx.load(str(bundle / graph_file), load_external_data=False)
    quantize_kv(model, absmax)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / graph_file))
    data = bundle / f"{graph_file}.data"
    link = out / data.name
    if not link.exists():
        link_or_copy(data, link)
    shutil.copy2(bundle / meta["tokenizer"]["file"], out / meta["tokenizer"]["file"])
    keep = {graph_file, data.name, meta["tokenizer"]["file"]}
    meta["files"] = {k: v for k, v in meta["files"].items() if k in keep}
    body = (out / graph_file).read_bytes()
    meta["files"][graph_file] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    meta["name"] = f"{meta['name']}-kv-int8"
    meta["graph"]["kv_cache"] = "int8"
    meta["graph"]["variants"] = {}
    if "requirements" in meta:  # the rewritten graph's own (int8 KV needs a newer onnxruntime)
        from export.targets import requirements

        req = requirements([out / graph_file], meta["requirements"].get("target", "cpu"))
        meta["requirements"] = {**meta["requirements"], **req, "graphs": {}}
    meta["kv_cache"] = {"dtype": "int8", "scales": "per channel (KV head x head_dim), absmax / 127", **calib}
    (out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def chunked_logits(engine: Engine, chunk: int) -> Any:
    """logits [len, V] of a window fed `chunk` tokens per forward into a fresh cache."""

    def logits(window: np.ndarray) -> np.ndarray:
        runner = engine.runner
        cache = runner.empty(1, len(window))
        parts = [
            runner.forward(np.asarray(window[a : a + chunk])[None, :], cache, all_logits=True)[0]
            for a in range(0, len(window), chunk)
        ]
        return np.concatenate(parts)

    return logits


def filled_cache(engine: Engine, batch: int, past: int) -> Any:
    """A batch cache whose `batch` rows hold `past` tokens (prefilled once, reused every round)."""
    cache = engine.runner.empty(batch, past + 8)
    engine.runner.forward_rows(np.full((batch, past), 7, np.int64), cache, 0)
    return cache


def decode_ms(engine: Engine, cache: Any, steps: int) -> float:
    """Median ms of one decode forward of every row of `cache`, which stays at its length."""
    batch = cache.batch
    token = np.full((batch, 1), 5, np.int64)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.runner.forward_rows(token, cache, 0)
        times.append(time.perf_counter() - t)
        cache.lengths[:batch] -= 1  # stay at the same past
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from edge_llm.bundle import load_bundle
    from export.evaluate import score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    ap.add_argument(
        "--variant", type=Path, default=Path("/tmp/edge-llm-kv-int8"), help="where the int8-KV bundle goes"
    )
    ap.add_argument("--reuse-variant", action="store_true", help="keep the int8 variant --variant holds")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--chunk", type=int, default=32, help="tokens per forward when scoring")
    ap.add_argument("--past", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kv_cache")
    args = ap.parse_args(argv)
    options = RunnerOptions(threads=args.threads, max_batch=8)
    base = Engine(load_bundle(args.bundle), options)
    text = args.text.read_text(encoding="utf-8")
    # evaluation: the file's first 10% (as the recipes evaluate); calibration: from its middle on
    eval_ids = np.array(base.tokenizer.encode(text[: len(text) // 10])[: args.eval_tokens], np.int64)
    calib_ids = np.array(
        base.tokenizer.encode(text[len(text) // 2 :][:200_000])[: args.calib_tokens], np.int64
    )
    t0 = time.perf_counter()
    kinds = {base.bundle.graph.kv_cache} | {v["kv_cache"] for v in base.bundle.graph.variants.values()}
    if kinds == {"fp32", "int8"}:  # exported with [fuse] kv_cache = "both": the board's choice
        base = Engine(base.bundle, dataclasses.replace(options, kv_cache="fp32"))
        variant = args.bundle
        calib = base.bundle.recipe.get("fuse") or {}
        int8 = Engine(base.bundle, dataclasses.replace(options, kv_cache="int8"))
    elif args.reuse_variant and (args.variant / "bundle.json").is_file():
        variant = args.variant
        calib = json.loads((variant / "bundle.json").read_text())["kv_cache"]
    else:
        absmax = calibrate(base, calib_ids, 1024)
        calib = {"calib_tokens": len(calib_ids), "calib_text": f"{args.text.name} from 50%"}
        variant = write_int8_variant(args.bundle, args.variant, absmax, calib)
        print(f"calibrated on {len(calib_ids)} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    if kinds != {"fp32", "int8"}:
        int8 = Engine(load_bundle(variant), options)
    engines = {"fp32": base, "int8": int8}
    result: dict[str, Any] = {"bundle": str(args.bundle), "calibration": calib, "chunk": args.chunk}
    for name, engine in engines.items():
        row = engine.runner.empty(1)
        per_token = sum(b.dtype.itemsize * b.shape[1] * b.shape[3] for b in row.buffers)
        result[name] = {"kv_dtype": str(row.buffers[0].dtype), "kv_bytes_per_token": per_token}
        result[name]["kv_mib_at_2048"] = per_token * 2048 / 2**20
    contexts = [c for c in args.contexts.split(",") if c.strip()]  # "" skips perplexity
    for ctx in [int(c) for c in contexts]:
        for name, engine in engines.items():
            t = time.perf_counter()
            r = score(eval_ids, chunked_logits(engine, args.chunk), ctx, ctx)
            result[name][f"ppl_{ctx}"] = r["perplexity"]
            print(
                f"{name} ctx {ctx}: ppl {r['perplexity']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True
            )
    for batch in (1, 8):
        runs: dict[str, list[float]] = {n: [] for n in engines}
        caches = {name: filled_cache(engine, batch, args.past) for name, engine in engines.items()}
        for r in range(args.rounds):
            for name in engines if r % 2 == 0 else reversed(list(engines)):
                runs[name].append(decode_ms(engines[name], caches[name], args.steps))
        del caches
        for name in engines:
            result[name][f"decode_ms_b{batch}_past{args.past}"] = statistics.median(runs[name])
            result[name][f"decode_ms_b{batch}_past{args.past}_runs"] = [round(x, 2) for x in runs[name]]
        print({n: [round(x, 2) for x in v] for n, v in runs.items()}, f"batch {batch}", flush=True)
    result["loadavg_1min_end"] = os.getloadavg()[0]
    f, q = result["fp32"], result["int8"]
    lines = [
        f"Bundle `{args.bundle.name}`, {args.threads} threads; "
        + (
            f"perplexity on {len(eval_ids)} WikiText tokens fed {args.chunk} per forward; "
            if contexts
            else ""
        )
        + f"decode step medians of {args.rounds} interleaved rounds "
        f"(load {result['loadavg_1min_end']:.1f} at the end).",
        "",
        "| KV | bytes/token | MiB at 2048 |"
        + "".join(f" ppl @{c} |" for c in contexts)
        + f" ms/step B=1 past {args.past} | ms/step B=8 past {args.past} |",
        "|---|---:|---:|" + "---:|" * len(contexts) + "---:|---:|",
    ]
    for name, r in (("fp32", f), ("int8", q)):
        lines.append(
            f"| {name} | {r['kv_bytes_per_token']} | {r['kv_mib_at_2048']:.1f} |"
            + "".join(f" {r[f'ppl_{c}']:.3f} |" for c in contexts)
            + f" {r[f'decode_ms_b1_past{args.past}']:.2f} | {r[f'decode_ms_b8_past{args.past}']:.2f} |"
        )
    write_results(args.out, result, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
