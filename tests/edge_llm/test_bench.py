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
    # the memory limit: weight bytes from the graph, bandwidth measured in this run, and the
    # fraction derived from both (issue 17 item 5)
    limit = report["read_bandwidth"]
    assert limit["gb_s"] == max(p["gb_s"] for p in limit["passes"]) > 0 and len(limit["passes"]) == 2
    assert ours["weight_bytes_per_token"] > 0
    assert ours["weight_gb_s"] == pytest.approx(ours["decode_tok_s"] * ours["weight_bytes_per_token"] / 1e9)
    assert ours["fraction_of_limit"] == pytest.approx(ours["weight_gb_s"] / limit["gb_s"])
    assert f"{ours['weight_gb_s']:.1f} ({ours['fraction_of_limit']:.2f}×)" in (out / "bench.md").read_text()
    assert f"Machine limit: {limit['gb_s']:.1f} GB/s" in proc.stdout
    assert (out / "bench.png").stat().st_size > 1000
    # a progress line as each system starts and ends (the run used to be silent for minutes)
    assert "edge-llm bench: [1/1] edge-llm ..." in proc.stderr
    assert "edge-llm bench: [1/1] edge-llm done in" in proc.stderr


def test_peers_come_from_the_caller(tiny_fused: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`edge-llm bench` has no --peers: benchmarks/bench.py hands its peer runner to `run`, which
    measures every peer on the very prompt ids it measured this runtime on."""
    from edge_llm.cli import build_parser
    from edge_llm.commands import bench

    seen: list[tuple[str, dict]] = []

    def fake_peer(system: str, ids: dict, settings: dict) -> dict:
        seen.append((system, ids))
        return {"system": system, "skipped": f"{system} is a stub", "settings": settings}

    parser = build_parser()
    argv = ["bench", "--bundle", str(tiny_fused), "--runs", "1", "--new-tokens", "4", "--batch-sizes", "1"]
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--peers"])
    args = parser.parse_args([*argv, "--long-tokens", "50", "--json", str(tmp_path / "b.json")])
    assert bench.run(args, peers=fake_peer) == 0
    assert [system for system, _ in seen] == list(bench.PEER_SYSTEMS)
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert results[0]["prompt_tokens"] == {"short": len(seen[0][1]["short"]), "long": 50}
    assert [r["system"] for r in results[1:]] == list(bench.PEER_SYSTEMS)
    err = capsys.readouterr().err
    assert "[4/4] transformers done in" in err and "skipped (transformers is a stub)" in err


def test_runtime_finds_nothing_by_its_own_path() -> None:
    """The runtime reaches nothing outside its package (it once ran ../benchmarks/peers.py)."""
    package = Path(__file__).resolve().parents[2] / "edge_llm"
    # pack.py is the workstation's packager (it builds the wheel from this checkout and copies the
    # unit and install.sh from it); packverify.py is copied into each package as verify.py and
    # checks the folder it sits in. Those two are about their own location by design.
    packaging = {"pack.py", "packverify.py"}
    for path in (p for p in package.rglob("*.py") if p.name not in packaging):
        source = path.read_text(encoding="utf-8")
        assert "__file__" not in source and "spec_from_file_location" not in source, path
