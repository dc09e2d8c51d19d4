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


def test_zero_rounds_or_runs_is_a_clear_error(tiny_fused: Path) -> None:
    """--rounds 0 used to end in an IndexError after loading the bundle."""
    from edge_llm.cli import build_parser
    from edge_llm.commands import bench
    from edge_llm.errors import ConfigError

    for flag in ("--rounds", "--runs"):
        args = build_parser().parse_args(["bench", "--bundle", str(tiny_fused), flag, "0"])
        with pytest.raises(ConfigError, match="must be >= 1"):
            bench.run(args)


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


def test_three_chats_rounds_and_answers(
    tiny_fused_variants: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 17's peer run: decode timed on three chat prompts for every system, ratios per prompt
    as the median of each round's own ratio, later rounds without the batch runs, every answer
    decoded with one tokenizer, and batch-1 decode on the single-stream engine (portable graph)
    while the concurrent rows run on the batching one (query_seqlens graph)."""
    import statistics

    from edge_llm import bench as measure
    from edge_llm.bundle import load_bundle
    from edge_llm.cli import build_parser
    from edge_llm.commands import bench
    from edge_llm.tokenizer import Tokenizer

    calls: list[tuple[str, dict, dict]] = []
    speeds = iter([10.0, 20.0, 40.0, 5.0, 10.0, 20.0] * 10)  # per call: its decode tok/s

    def fake_peer(system: str, ids: dict, settings: dict) -> dict:
        calls.append((system, ids, settings))
        v = next(speeds)
        keys = measure.chat_keys(ids)
        return {
            "system": system,
            "skipped": None,
            "decode_tok_s": v,
            "decode_tok_s_by_prompt": {k: v for k in keys},
            "output_ids_by_prompt": {k: ids[k][:4] for k in keys},  # echoes its prompt
            "ttft_short_ms": 1.0,
            "ttft_long_ms": 1.0,
            "peak_rss_mib": 1.0,
            "prompt_tokens": {"short": len(ids["short"]), "long": len(ids["long"])},
            "weight_bytes_per_token": 1000,
        }

    argv = ["bench", "--bundle", str(tiny_fused_variants), "--runs", "1", "--new-tokens", "4"]
    argv += ["--batch-sizes", "1,2", "--long-tokens", "50", "--chats", "3", "--rounds", "2"]
    args = build_parser().parse_args(
        [*argv, "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")]
    )
    args.peer_systems = ["llamacpp", "ortgenai"]
    assert bench.run(args, peers=fake_peer) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    # the table is round 1's (with the concurrent runs), and says so
    assert (tmp_path / "b.md").read_text().startswith("Round 1 of 2 (the round with the concurrent runs)")

    # the same three chat prompts (ChatML turns of CHATS, from the bundle's tokenizer) for everyone
    tok = Tokenizer(load_bundle(tiny_fused_variants))
    want = [tok.encode(measure.chat_prompt(c)) for c in measure.CHATS]
    for _, ids, _ in calls:
        assert [ids["short"], ids["chat2"], ids["chat3"]] == want
    batches = [(s, st["batch_size"]) for s, _, st in calls]
    assert batches == [("llamacpp", 4), ("ortgenai", 4), ("llamacpp", 0), ("ortgenai", 0)]
    ours = report["results"][0]
    assert set(ours["decode_tok_s_by_prompt"]) == {"short", "chat2", "chat3"}
    assert all(len(v) == 4 for v in ours["output_ids_by_prompt"].values())
    assert ours["decode_graph"] != ours["batch_graph"]  # portable for one stream, ragged for 2
    assert set(ours["batch_tok_s_by_size"]) == {"1", "2"}

    # ratios: each round's own, then their median; round 2 ran without batch runs
    assert len(report["rounds"]) == 2
    over = report["ratios_over_rounds"]["edge-llm / llamacpp"]["chat3"]
    mine = [rnd[0]["decode_tok_s_by_prompt"]["chat3"] for rnd in report["rounds"]]
    theirs = [rnd[1]["decode_tok_s_by_prompt"]["chat3"] for rnd in report["rounds"]]
    assert over["rounds"] == pytest.approx([a / b for a, b in zip(mine, theirs, strict=True)])
    assert over["median"] == pytest.approx(statistics.median(over["rounds"]))

    # answers as text; the echoing peer shares no leading token with our answer unless it equals it
    ans = report["outputs"]["llamacpp"]["chat2"]
    assert ans["new_tokens"] == 4 and ans["text"] == tok.decode(want[1][:4])
    assert report["outputs"]["edge-llm"]["short"]["same_prefix_as_first_row"] == 4
    assert report["results"][1]["weight_bytes_from"] == "own model file"
    out = capsys.readouterr().out
    assert "Decode ratio per chat prompt, median of 2 round(s)" in out and "| edge-llm / ortgenai |" in out
