"""benchmarks/attention_micro.py runs end to end on the tiny fused bundle (figures, not speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import attention_micro  # noqa: E402


def test_runs_on_a_tiny_bundle(tiny_fused: Path, tmp_path: Path) -> None:
    out = tmp_path / "attn"
    rows = attention_micro.main([str(tiny_fused), "--steps", "5", "--threads", "1", "--out", str(out)])
    assert [(r["batch"], r["past"]) for r in rows] == [(1, 64), (8, 64)]  # past 256 > tiny context
    assert all(r["gqa_us_per_layer"] > 0 and r["forward_ms"] > 0 for r in rows)
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == rows
    assert "| 8 | 64 |" in out.with_suffix(".md").read_text()
