"""benchmarks/kv_cache.py: the int8-KV variant of a fused bundle loads, keeps a quarter of the KV
bytes, decodes close to the fp32 cache, and the script writes its figures (not speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import kv_cache  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def variant(tiny_fused: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = Engine.load(tiny_fused, RunnerOptions(threads=1))
    ids = np.random.default_rng(0).integers(3, 384, 200)
    absmax = kv_cache.calibrate(base, ids, 100)
    assert absmax.shape == (2, 2, 2, 16) and (absmax > 0).all()  # layers, K/V, kv heads, head_dim
    return kv_cache.write_int8_variant(tiny_fused, tmp_path_factory.mktemp("kv") / "int8", absmax, {})


def test_variant_keeps_int8_kv(tiny_fused: Path, variant: Path) -> None:
    meta = json.loads((variant / "bundle.json").read_text())
    assert meta["kv_cache"]["dtype"] == "int8"
    base = Engine.load(tiny_fused, RunnerOptions(threads=1))
    int8 = Engine.load(variant, RunnerOptions(threads=1))  # checksums of the rewritten graph hold
    assert base.runner.kv_dtype == np.float32 and int8.runner.kv_dtype == np.int8
    a, b = base.runner.empty(2), int8.runner.empty(2)
    assert {buf.dtype for buf in b.buffers} == {np.dtype(np.int8)}
    assert sum(x.nbytes for x in a.buffers) == 4 * sum(x.nbytes for x in b.buffers)


def test_int8_kv_decodes_close_to_fp32(tiny_fused: Path, variant: Path) -> None:
    """Prefill, then decode token by token on the two rows of a batch cache (every step reads the
    quantized cache; on CPU the prefill does too): logits stay close to the fp32 cache's."""
    base = Engine.load(tiny_fused, RunnerOptions(threads=1, max_batch=2))
    int8 = Engine.load(variant, RunnerOptions(threads=1, max_batch=2))
    ids = np.random.default_rng(1).integers(3, 384, (2, 40))
    out = {}
    for name, engine in (("fp32", base), ("int8", int8)):
        cache = engine.runner.empty(2)
        steps = [engine.runner.forward_rows(ids[:, :30], cache, 0)]
        steps += [engine.runner.forward_rows(ids[:, t : t + 1], cache, 0) for t in range(30, 40)]
        out[name] = np.stack(steps)
        assert list(cache.lengths) == [40, 40]
    ref, got = out["fp32"], out["int8"]
    # measured on this random (peaky) tiny model: relative RMS 0.064, argmax agreement 0.91;
    # a cache read as garbage (wrong type or scale) gives a relative RMS near 1
    assert np.sqrt(((got - ref) ** 2).mean()) < 0.15 * np.sqrt((ref**2).mean())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    assert not np.array_equal(got, ref)  # the cache really is quantized


def test_script_writes_its_table(tiny_fused: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. Small models run on boards. " * 200)
    out = tmp_path / "kv"
    argv = [str(tiny_fused), "--text", str(text), "--variant", str(tmp_path / "v"), "--out", str(out)]
    argv += ["--calib-tokens", "128", "--eval-tokens", "128", "--contexts", "32,64", "--chunk", "16"]
    argv += ["--past", "32", "--rounds", "2", "--steps", "2", "--threads", "1"]
    result = kv_cache.main(argv)
    fp32, int8 = result["fp32"], result["int8"]
    assert fp32["kv_bytes_per_token"] == 4 * int8["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    for key in ("ppl_32", "ppl_64", "decode_ms_b1_past32", "decode_ms_b8_past32"):
        assert fp32[key] > 0 and int8[key] > 0, key
    assert len(int8["decode_ms_b8_past32_runs"]) == 2
    table = out.with_suffix(".md").read_text()
    assert "| int8 | 128 |" in table and "ppl @64" in table
    # decode speed alone, on the variant already built (no second calibration)
    again = kv_cache.main([*argv[:7], "--reuse-variant", "--contexts", "", "--past", "32", "--rounds", "1"])
    assert again["calibration"] == {"dtype": "int8", **again["calibration"]} and "ppl_32" not in again["int8"]
    assert again["int8"]["decode_ms_b1_past32"] > 0
