"""benchmarks/gemm_shapes.py on small shapes: each format's graph computes the fp32 graph's
products (within its quantization error), and the timings and the profiler's split by GEMM
shape come back for every format and M (figures, not speed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import gemm_shapes  # noqa: E402

SMALL = ["--hidden", "64", "--qkv", "96", "--mlp", "128", "--vocab", "320", "--layers", "2"]


def test_format_graphs_compute_the_fp32_products(tmp_path: Path) -> None:
    ap = argparse.Namespace(hidden=64, qkv=96, mlp=128, vocab=320, layers=2)
    fp32 = tmp_path / "fp32" / "model.onnx"
    fp32.parent.mkdir()
    gemm_shapes.fp32_stack(ap, fp32)
    feed = gemm_shapes.feeds(ap, 4)
    assert len(feed) == 2 * 4 + 1  # one input per GEMM: 4 per layer + lm_head
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, feed)
    for fmt in ("nbits8-b64-a4", "nbits8-b32-a4-h0", "dynamic", "nbits4-b32-a4"):
        sess = ort.InferenceSession(
            str(gemm_shapes.build(fmt, fp32, tmp_path)), providers=["CPUExecutionProvider"]
        )
        got = sess.run(None, feed)
        assert [g.shape for g in got] == [r.shape for r in ref]
        tol = 0.25 if fmt.startswith("nbits4") else 0.05  # int8: ~1% of the scale, 4-bit ~8x that
        for g, r in zip(got, ref, strict=True):
            assert np.abs(g - r).max() <= tol * np.abs(r).max(), fmt


def test_runs_and_splits_by_shape(tmp_path: Path) -> None:
    out = tmp_path / "g"
    argv = [*SMALL, "--formats", "nbits8-b64-a4,dynamic", "--ms", "1,2", "--rounds", "1", "--reps", "2"]
    doc = gemm_shapes.main(
        [*argv, "--profile-runs", "2", "--clock", "cpu", "--work", str(tmp_path), "--out", str(out)]
    )
    for fmt in ("nbits8-b64-a4", "dynamic"):
        assert all(doc["best_ms"][fmt][m] > 0 and doc["median_ms"][fmt][m] > 0 for m in (1, 2))
        for m in (1, 2):
            split = doc["per_shape_us"][fmt][m]
            assert all(split[g] > 0 for g in ("qkv", "o", "gate_up", "down", "lm_head")), (fmt, m, split)
    assert json.loads(out.with_suffix(".json").read_text())["args"]["clock"] == "cpu"
    table = out.with_suffix(".md").read_text()
    assert "| dynamic | 2 |" in table and "| nbits8-b64-a4 |" in table
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]  # graphs removed
