"""The bench's memory-limit figures: weight bytes per token read from the graph, the machine's
read bandwidth and the fraction derived from both (issue 17 item 5). Never asserts on speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_llm import bandwidth


def _reference_bytes(graph: Path) -> int:
    """The same count with the onnx package (an export dependency; the runtime has no onnx)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    ops = {o.decode() for o in bandwidth._STREAMED_OPS}
    names = {i for n in model.graph.node if n.op_type in ops for i in n.input[1:] if i in inits}
    total = 0
    for name in names:
        t = inits[name]
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


@pytest.mark.parametrize("kind", ["tiny_fused_int8", "tiny_fused", "tiny_bundle_int8"])
def test_weight_bytes_match_onnx(kind: str, request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue(kind)
    meta = json.loads((bundle / "bundle.json").read_text())
    counted = bandwidth.weight_bytes_per_token(bundle / meta["graph"]["file"])
    assert counted["matmuls"] > 0
    assert counted["bytes"] == _reference_bytes(bundle / meta["graph"]["file"]) > 0


def test_int8_bytes_are_about_a_byte_per_weight(tiny_fused_int8: Path, tiny_fused: Path) -> None:
    """int8 + fp32 scales per 16-wide block = 1.25 bytes per weight against fp32's 4 (the tiny
    bundles quantize with block_size 16)."""
    i8 = bandwidth.weight_bytes_per_token(tiny_fused_int8 / "model.onnx")["bytes"]
    f32 = bandwidth.weight_bytes_per_token(tiny_fused / "model.onnx")["bytes"]
    assert i8 / f32 == pytest.approx(1.25 / 4, rel=0.02)


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x08\x07")  # ir_version only: no graph
    with pytest.raises(ValueError, match="no graph"):
        bandwidth.weight_bytes_per_token(bad)


def test_read_bandwidth_record() -> None:
    r = bandwidth.read_bandwidth(threads=2, passes=2, buffer_mib=8)
    assert r["threads"] == 2 and r["buffer_mib"] == 8 and len(r["gb_s_runs"]) == 2
    assert r["gb_s"] == max(r["gb_s_runs"]) > 0 and r["gb_s_median"] <= r["gb_s"]


def test_default_buffer_outgrows_the_cache() -> None:
    llc = bandwidth.last_level_cache_bytes()
    if llc is None:
        pytest.skip("no cache sizes in sysfs")
    assert min(1024, max(256, 8 * llc // bandwidth.MIB)) * bandwidth.MIB >= min(1 << 30, 8 * llc)


def test_decode_traffic_arithmetic() -> None:
    t = bandwidth.decode_traffic(200.0, 140_000_000, 20.0)
    assert t["weight_gb_s"] == pytest.approx(28.0) and t["fraction_of_limit"] == pytest.approx(1.4)


def test_add_limit_charges_peers_the_bundle_bytes() -> None:
    from edge_llm.commands.bench import add_limit, markdown

    base = {"ttft_short_ms": 1.0, "ttft_long_ms": 2.0, "peak_rss_mib": 3.0, "prompt_tokens": {}}
    results = [
        {**base, "system": "edge-llm", "decode_tok_s": 100.0, "weight_bytes_per_token": 10**8},
        {**base, "system": "llamacpp", "decode_tok_s": 50.0},
        {"system": "ortgenai", "skipped": "not installed"},
    ]
    passes = [
        {"gb_s": 10.0, "gb_s_median": 9.0, "threads": 2, "buffer_mib": 256},
        {"gb_s": 12.0, "gb_s_median": 11.0, "threads": 2, "buffer_mib": 256},
    ]
    limit = add_limit(results, passes)
    assert limit["gb_s"] == 12.0 and limit["passes"] == passes
    assert results[0]["weight_gb_s"] == pytest.approx(10.0) and results[0][
        "fraction_of_limit"
    ] == pytest.approx(10 / 12)
    assert results[1]["weight_bytes_from"] == "edge-llm bundle" and results[1][
        "weight_gb_s"
    ] == pytest.approx(5.0)
    assert "weight_gb_s" not in results[2]
    table = markdown(results, limit)
    assert "10.0 (0.83×)" in table and "5.0 (0.42×)" in table and "Machine limit: 12.0 GB/s" in table
