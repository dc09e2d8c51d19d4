"""OpenVINO precision settings against the CPU EP on one bundle: answer, logits, perplexity, speed.

Run in a venv with onnxruntime-openvino (its wheel replaces the `onnxruntime` module) and the
runtime's dependencies, with the repo on PYTHONPATH:

    PYTHONPATH=. /work/venvs/openvino/bin/python benchmarks/openvino_precision.py --bundle OVB \
        --text /work/shared/data/wikitext-2/valid.txt --ppl-tokens 2048 --decode 32 \
        --out benchmarks/results/openvino_precision

Each row is a session on the same bundle (`--rows` picks some): `cpu` the CPU EP; `bundle`
OpenVINO with the bundle's own options (bundle.json `provider_options`: what `--provider
openvino` gets); `FP32` (the EP's default on CPU); `ACCURACY`; `FP32-dq0` FP32 with the CPU
plugin's dynamic quantization of activations off (DYNAMIC_QUANTIZATION_GROUP_SIZE 0);
`FP32-bf16` FP32 with bf16 inference (INFERENCE_PRECISION_HINT). For each: the two
likeliest first tokens of the chat answer to --prompt and the margin between them, the greedy
answer, max |logit diff| against the CPU EP and against ACCURACY over the first --positions
tokens of --text, perplexity over --ppl-tokens tokens (windows of --context, as `edge-llm eval`),
and decode tok/s of --decode greedy tokens (median of --runs, rows interleaved in each run).
tests/edge_llm/test_openvino.py runs it on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.qnn_bundle import token_ids  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.board import RunnerOptions  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.providers import ProviderSpec  # noqa: E402
from edge_llm.sampling import SamplingParams  # noqa: E402
from export.evaluate import score  # noqa: E402


def _cpu_config(key: str, value: str) -> str:
    return json.dumps({"CPU": {key: value}})


ROWS: dict[str, ProviderSpec] = {
    "cpu": ProviderSpec("cpu"),  # the CPU EP
    "bundle": ProviderSpec("openvino"),  # OpenVINO with bundle.json provider_options
    "FP32": ProviderSpec("openvino", {"precision": "FP32"}),
    "ACCURACY": ProviderSpec("openvino", {"precision": "ACCURACY"}),
    "FP32-dq0": ProviderSpec(
        "openvino", {"precision": "FP32", "load_config": _cpu_config("DYNAMIC_QUANTIZATION_GROUP_SIZE", "0")}
    ),
    "FP32-bf16": ProviderSpec(
        "openvino", {"precision": "FP32", "load_config": _cpu_config("INFERENCE_PRECISION_HINT", "bf16")}
    ),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an openvino-target bundle")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--prompt", default="What is the capital of France?", help="chat prompt (first token)")
    ap.add_argument("--answer-tokens", type=int, default=12, help="greedy answer length")
    ap.add_argument("--text", type=Path, help="text for logits and perplexity (default: random ids)")
    ap.add_argument("--positions", type=int, default=64, help="text positions whose logits are compared")
    ap.add_argument("--ppl-tokens", type=int, default=0, help="perplexity over this many tokens (0: skip)")
    ap.add_argument("--context", type=int, default=512, help="perplexity window")
    ap.add_argument("--decode", type=int, default=0, help="greedy tokens per speed run (0: skip)")
    ap.add_argument("--runs", type=int, default=3, help="speed runs (rows interleaved in each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    load_before = os.getloadavg()[0]
    engines = {
        n: Engine.load(args.bundle, RunnerOptions(threads=args.threads, providers=(ROWS[n],))) for n in names
    }
    first = next(iter(engines.values()))
    prompt = first.encode_request(messages=[{"role": "user", "content": args.prompt}])
    ids = token_ids(first, args.text, max(args.positions, args.ppl_tokens))
    rows: dict[str, dict[str, Any]] = {}
    logits: dict[str, np.ndarray] = {}
    for name, engine in engines.items():
        last = engine.score(prompt)[-1]
        top = np.argsort(-last)[:2]
        answer = engine.complete(prompt, SamplingParams(max_tokens=args.answer_tokens))
        logits[name] = engine.score(ids[: args.positions])
        rows[name] = {
            "provider": engine.runner.provider,
            "options": engine.runner.plan.provider_options[0],
            "cpu_fallback_nodes": engine.runner.cpu_fallback_nodes,
            "first_tokens": [[engine.tokenizer.decode([int(t)]), round(float(last[t]), 4)] for t in top],
            "margin": round(float(last[top[0]] - last[top[1]]), 4),
            "answer": answer.text,
        }
        if args.ppl_tokens:
            ppl = score(np.asarray(ids[: args.ppl_tokens]), engine.score, args.context, args.context)
            rows[name] |= {"perplexity": round(ppl["perplexity"], 4), "scored_tokens": ppl["scored_tokens"]}
        print(name, json.dumps(rows[name], ensure_ascii=False), flush=True)
    for name in names:
        for ref in ("cpu", "ACCURACY"):
            if ref in logits and ref != name:
                rows[name][f"max_diff_vs_{ref}"] = round(float(np.abs(logits[name] - logits[ref]).max()), 5)
                # Rounded to 5 decimals above: only this says "bit for bit".
                rows[name][f"bit_identical_to_{ref}"] = bool(np.array_equal(logits[name], logits[ref]))
    if args.decode:
        speeds: dict[str, list[float]] = {n: [] for n in names}
        params = SamplingParams(max_tokens=args.decode, ignore_eos=True)
        for _ in range(args.runs):
            for name, engine in engines.items():
                speeds[name].append(engine.complete(prompt, params).usage.decode_tok_s)
        for name in names:
            rows[name]["decode_tok_s"] = round(statistics.median(speeds[name]), 2)
            rows[name]["decode_runs"] = [round(s, 2) for s in speeds[name]]
    load = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    lines = [
        f"Bundle `{args.bundle.name}`, prompt {args.prompt!r}, {args.threads} threads, "
        f"load {load[0]} → {load[1]}",
        "",
        "| row | provider | first tokens (logit) | margin | answer | max Δ vs CPU EP | max Δ vs ACCURACY "
        "| perplexity | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        tokens = ", ".join(f"{t!r} {v}" for t, v in r["first_tokens"])
        cells = [name, r["provider"], tokens, r["margin"], r["answer"].replace("|", "\\|").replace("\n", " ")]
        cells += [r.get(k, "") for k in ("max_diff_vs_cpu", "max_diff_vs_ACCURACY", "perplexity")]
        cells.append(r.get("decode_tok_s", ""))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n".join(lines))
    if args.out:
        doc = {"bundle": str(args.bundle), "load": load, "settings": vars(args), "rows": rows}
        write_results(args.out, doc, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
