"""serve_load runs end to end on the tiny fused bundle (its figures are not checked: speed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import serve_load


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")
def test_serve_load_smoke(tiny_fused: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve_load"
    got = serve_load.main(
        [str(tiny_fused), "--clients", "1,2", "--rounds", "1", "--new-tokens", "4", "--threads", "1",
         "--start-broker", "nodelay", "--chunk-qos", "0,1", "--out", str(out)]
    )  # fmt: skip
    names = list(got["transports"])
    assert names == ["socket", "mqtt (nodelay broker, chunks QoS 0)", "mqtt (nodelay broker, chunks QoS 1)"]
    for rows in got["transports"].values():
        assert [r["clients"] for r in rows] == [1, 2]
        for r in rows:
            assert r["requests"] == r["clients"] and r["tok_s"] > 0
            assert 0 < r["ttfc_ms_p50"] <= r["latency_ms_p50"]
    md = out.with_suffix(".md").read_text()
    assert "| mqtt (nodelay broker, chunks QoS 0) | 2 |" in md and out.with_suffix(".json").is_file()
    with pytest.raises(SystemExit):
        serve_load.main([str(tiny_fused), "--chunk-qos", "2"])
