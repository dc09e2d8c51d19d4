"""benchmarks/step_profile.py on the tiny fused bundle: per-operator times at batch 1 and 8 from
onnxruntime's profiler are read back and tabulated (not their speed)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import step_profile  # noqa: E402


def test_profile_by_operator(tiny_fused: Path, tmp_path: Path) -> None:
    out = tmp_path / "prof"
    result = step_profile.main(
        [str(tiny_fused), "--past", "8", "--steps", "3", "--threads", "1", "--out", str(out)]
    )
    for b in ("b1", "b8"):
        assert result[b]["step_ms"] > 0
        assert result[b]["ops"]["GroupQueryAttention"] > 0 and result[b]["ops"]["MatMul"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| GroupQueryAttention |" in table and "| all kernels |" in table
    assert not list(Path("/tmp").glob("edge-llm-step-profile-*"))  # profiles removed
