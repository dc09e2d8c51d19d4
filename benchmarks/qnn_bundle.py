"""A qnn-htp bundle on the QNN HTP simulator vs the same QDQ graphs on the CPU EP: logits and speed.

Run in a venv with onnxruntime-qnn (its x86_64 wheel's libQnnHtp.so simulates the HTP) and the
runtime's dependencies, with the repo on PYTHONPATH:

    PYTHONPATH=. /work/venvs/qnn/bin/python benchmarks/qnn_bundle.py --bundle QB \
        --text /work/shared/data/wikitext-2/valid.txt --positions 64 --json OUT.json

Both engines score the same token ids from an empty cache (the static runner: prefill chunks of
the bundle's `prefill_length`, right-padded): the QNN one loads the bundle's EPContext models
(context binaries compiled at export), the CPU one the plain QDQ graphs they were compiled from.
Printed (and written): max |logit difference|, top-1 agreement over the positions, the provider
each ran on, nodes that fell back to CPU, session load and forward seconds, and, with --decode N,
decode tok/s of N greedy tokens on each. tests/edge_llm/test_qnn.py runs it on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_llm.board import RunnerOptions
from edge_llm.engine import Engine
from edge_llm.providers import ProviderSpec
from edge_llm.sampling import SamplingParams


def token_ids(engine: Engine, text: Path | None, positions: int) -> list[int]:
    """The first `positions` tokens of `text` (deterministic ids from the vocabulary without)."""
    if text is None:
        vocab = engine.bundle.architecture.vocab_size
        return [int(i) for i in np.random.default_rng(0).integers(3, vocab - 1, size=positions)]
    ids = engine.tokenizer.encode(text.read_text(encoding="utf-8")[: positions * 20])
    if len(ids) < positions:
        raise SystemExit(f"{text}: only {len(ids)} tokens in the first {positions * 20} characters")
    return ids[:positions]


def measure(bundle: Path, provider: str, ids: list[int], decode: int, threads: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine = Engine.load(bundle, RunnerOptions(threads=threads, providers=(ProviderSpec(provider),)))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = engine.score(ids)
    score_s = time.perf_counter() - t0
    runner = engine.runner
    out: dict[str, Any] = {
        "provider": runner.provider,
        "graph": runner.session_file.name,
        "cpu_fallback_nodes": runner.cpu_fallback_nodes,
        "load_s": round(load_s, 3),
        "score_s": round(score_s, 3),
        "forwards": -(-len(ids) // runner.chunk) if hasattr(runner, "chunk") else len(ids),
        "logits": logits,
    }
    if decode:
        params = SamplingParams(max_tokens=decode, ignore_eos=True)
        final = engine.complete(ids[:8], params)
        out["decode_tok_s"] = round(final.usage.decode_tok_s, 3)
        out["ttft_s"] = round(final.usage.ttft_s, 3)
        out["tokens"] = list(final.token_ids)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--bundle", type=Path, required=True, help="a qnn-htp bundle (edge-llm export --target qnn-htp)"
    )
    ap.add_argument("--text", type=Path, help="text whose first tokens are scored (default: random ids)")
    ap.add_argument("--positions", type=int, default=64, help="positions compared (≥ 64 for the report)")
    ap.add_argument("--decode", type=int, default=0, help="also decode N greedy tokens on each provider")
    ap.add_argument("--threads", type=int, default=0, help="CPU EP threads (0: all cores)")
    ap.add_argument("--json", type=Path, help="write the result (and --npz the logits) here")
    ap.add_argument("--npz", type=Path, help="write both providers' logits here")
    args = ap.parse_args(argv)
    probe = Engine.load(args.bundle, RunnerOptions(threads=1))
    ids = token_ids(probe, args.text, args.positions)
    del probe
    qnn = measure(args.bundle, "qnn", ids, args.decode, args.threads)
    cpu = measure(args.bundle, "cpu", ids, args.decode, args.threads)
    a, b = qnn.pop("logits"), cpu.pop("logits")
    if args.npz:
        np.savez(args.npz, qnn=a, cpu=b, ids=np.array(ids))
    result = {
        "bundle": str(args.bundle),
        "positions": len(ids),
        "max_abs_diff": float(np.abs(a - b).max()),
        "mean_abs_diff": float(np.abs(a - b).mean()),
        "cpu_logit_range": [float(b.min()), float(b.max())],
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "qnn": qnn,
        "cpu": cpu,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if qnn["provider"] == "QNNExecutionProvider" else 1


if __name__ == "__main__":
    sys.exit(main())
