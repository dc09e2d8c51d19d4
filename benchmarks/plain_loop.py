"""Baseline for the foundation issue: a plain optimum export + MatMulNBits int8 driven by the
simplest numpy loop (session.run with numpy feeds, past copied back in every step) — what a user
gets without this runtime. Prints decode tok/s for the same prompt and length as `edge-llm bench`.

    python benchmarks/plain_loop.py BUNDLE_DIR [--new-tokens 128] [--runs 5] [--threads 2]

BUNDLE_DIR must be a concat-layout (optimum) bundle, e.g. `edge-llm export --graph optimum`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

from edge_llm.bench import SHORT_PROMPT
from edge_llm.bundle import load_bundle
from edge_llm.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    b = load_bundle(a.bundle)
    if b.graph.kv_layout != "concat":
        raise SystemExit("plain_loop needs an optimum (concat KV) bundle")
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(str(b.graph_path), so, providers=["CPUExecutionProvider"])
    arch = b.architecture
    ids = Tokenizer(b).encode(SHORT_PROMPT)
    rates = []
    for _ in range(a.runs + 1):  # the first run warms up
        past = {
            f"past_key_values.{i}.{k}": np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
            for i in range(arch.num_layers)
            for k in ("key", "value")
        }
        tokens, n_past, t_first = list(ids), 0, 0.0
        for step in range(a.new_tokens):
            feed = {
                "input_ids": np.array([tokens], np.int64),
                "attention_mask": np.ones((1, n_past + len(tokens)), np.int64),
                "position_ids": np.arange(n_past, n_past + len(tokens), dtype=np.int64)[None],
                **past,
            }
            out = sess.run(None, feed)
            n_past += len(tokens)
            tokens = [int(out[0][0, -1].argmax())]
            past = {
                name.replace("present", "past_key_values"): v
                for name, v in zip([o.name for o in sess.get_outputs()][1:], out[1:], strict=True)
            }
            if step == 0:
                t_first = time.perf_counter()
        rates.append((a.new_tokens - 1) / (time.perf_counter() - t_first))
    print(
        json.dumps(
            {
                "system": "plain optimum + numpy loop",
                "bundle": str(b.path),
                "decode_tok_s": statistics.median(rates[1:]),
                "runs": rates[1:],
            }
        )
    )


if __name__ == "__main__":
    main()
