"""Drive a fused bundle the ways the runtime does and save the logits (run under any onnxruntime).

    python tests/ort_probe.py BUNDLE OUT.npz   (PYTHONPATH = the repo root)
    python tests/ort_probe.py --gap BUNDLE ROWS   prints decode_verify_gap (max_batch ROWS)

Ragged first prompts in one batch, a batched decode step, and a multi-token step over a past
(a chat's next turn): GroupQueryAttention's three paths. tests/edge_llm/test_ort_versions.py
runs it under an old onnxruntime and compares with the installed one.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort

from benchmarks.exact_decode import decode_verify_gap
from edge_llm.engine import Engine
from edge_llm.runner import RunnerOptions


def probe(bundle: str) -> dict[str, np.ndarray]:
    engine = Engine.load(bundle, RunnerOptions(threads=1, max_batch=2))
    runner = engine.runner
    rows = np.array([[5, 17, 42, 9, 33, 8], [7, 21, 3, 0, 0, 0]], np.int64)  # 6 and 3 real tokens
    cache = runner.empty(2)
    prefill = runner.forward_rows(rows, cache, 0, counts=np.array([6, 3]))
    decode = runner.forward_rows(np.array([[11], [12]], np.int64), cache, 0)
    single = runner.empty(1)
    runner.forward(np.array([[5, 17, 42, 9]], np.int64), single)
    turn = runner.forward(np.array([[30, 31, 32]], np.int64), single, all_logits=True)
    return {"prefill": prefill, "decode": decode, "turn": turn, "ort": np.array(ort.__version__)}


if __name__ == "__main__" and sys.argv[1] == "--gap":
    options = RunnerOptions(threads=1, max_batch=int(sys.argv[3]), speculation="off")
    print(repr(decode_verify_gap(Engine.load(sys.argv[2], options))))
elif __name__ == "__main__":
    np.savez(sys.argv[2], **probe(sys.argv[1]))
