"""benchmarks/concurrency_paired.py on the tiny fused bundle: 8 simultaneous requests share one
prefill forward, and the figures are written (not their speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import concurrency_paired  # noqa: E402


def test_eight_prompts_one_prefill_forward(tiny_fused: Path, tmp_path: Path) -> None:
    out = tmp_path / "conc"
    argv = [str(tiny_fused), "--rounds", "2", "--new-tokens", "8", "--threads", "1", "--out", str(out)]
    result = concurrency_paired.main(argv)
    for run in result["runs"][8]:
        assert run["prefill_forwards"] == 1 and run["prefill_shapes"][0][0] == 8
        assert run["decode_steps"] == 7  # the first token comes from the prefill
    assert len(result["speedup_8_per_round"]) == 2 and result["speedup_8_median"] > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["speedup_8_median"] == result["speedup_8_median"]
    assert "Median 8/1" in out.with_suffix(".md").read_text()
