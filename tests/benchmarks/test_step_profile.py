"""benchmarks/step_profile.py on the tiny fused bundle: per-operator times at batch 1 and 8 from
onnxruntime's profiler are read back and tabulated (not their speed)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import step_profile  # noqa: E402


def test_profile_by_operator(tiny_fused_variants: Path, tmp_path: Path) -> None:
    out = tmp_path / "prof"
    argv = [str(tiny_fused_variants), "--past", "8", "--steps", "3", "--threads", "1", "--out", str(out)]
    result = step_profile.main([*argv, "--graph", "ragged", "--shapes", "1x1,2x3", "--rounds", "2"])
    for b in ("b1", "b8"):
        assert result[b]["step_ms"] > 0
        assert result[b]["ops"]["GroupQueryAttention"] > 0 and result[b]["ops"]["MatMul"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| GroupQueryAttention |" in table and "| all kernels |" in table
    assert not list(Path("/tmp").glob("edge-llm-step-profile-*"))  # profiles removed
    assert len(result["shapes_ms"]["2x3"]) == 2 and "| 2x3 |" in table
    cpu = [*argv, "--graph", "ragged", "--shapes", "1x1,2x1", "--rounds", "2", "--clock", "cpu"]
    paired = step_profile.main([*cpu, "--against", str(tiny_fused_variants)])
    assert paired["shapes_clock"] == "cpu"
    assert all(len(v) == 2 and min(v) > 0 for v in paired["shapes_ms"].values())
    against = paired["against"][str(tiny_fused_variants)]
    assert set(against) == {"1x1", "2x1"} and all(len(v) == 2 and min(v) > 0 for v in against.values())
    table = out.with_suffix(".md").read_text()
    assert "(CPU time of 1 thread)" in table
    assert table.count(f"{tiny_fused_variants.name} ms | vs first") == 2
