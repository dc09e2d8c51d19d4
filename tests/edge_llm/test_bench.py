"""The benchmark runs end to end on a tiny bundle and writes every output (not its speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("kind", ["tiny_bundle", "tiny_fused"])
def test_bench_writes_json_markdown_png(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    bundle = request.getfixturevalue(kind)
    out = tmp_path / "r"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench.py",
            "--bundle",
            str(bundle),
            "--runs",
            "1",
            "--new-tokens",
            "4",
            "--batch-sizes",
            "1,2",
            "--long-tokens",
            "100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())
    ours = report["results"][0]
    assert ours["system"] == "edge-llm" and ours["skipped"] is None
    assert ours["prompt_tokens"]["long"] == 100 and ours["new_tokens"] == 4
    for key in ("decode_tok_s", "ttft_short_ms", "ttft_long_ms", "peak_rss_mib", "first_token_after_load_s"):
        assert ours[key] > 0, key
    assert set(ours["batch_tok_s_by_size"]) == {"1", "2"}
    assert ours["cpu"]["cores"] >= 1 and "isa" in ours["cpu"]  # which int8 kernels ran
    assert "edge-llm" in (out / "bench.md").read_text() and "edge-llm" in proc.stdout
    assert (out / "bench.png").stat().st_size > 1000
