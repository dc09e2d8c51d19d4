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
    assert result["graphs"] == ["portable"]  # the tiny bundle has no query_seqlens graph
    for run in result["runs"]["portable"][8]:
        assert run["prefill_forwards"] == 1 and run["prefill_shapes"][0][0] == 8
        assert run["decode_steps"] == 7  # the first token comes from the prefill
        assert run["other_ms"] > 0 and run["decode_ms"] > 0
    assert len(result["speedup_8_per_round"]) == 2 and result["speedup_8_median"] > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["speedup_8_median"] == result["speedup_8_median"]
    assert "Median 8/1" in out.with_suffix(".md").read_text()


def test_staggered_arrivals_fold_on_the_ragged_graph(tiny_fused_variants: Path, tmp_path: Path) -> None:
    """Requests arriving mid-stream: prefilled alone on the portable graph, folded into the decode
    steps on the ragged one (no [1, S] forward after the first request's)."""
    out = tmp_path / "stagger"
    argv = [str(tiny_fused_variants), "--rounds", "1", "--new-tokens", "12", "--threads", "1"]
    argv += ["--graphs", "portable,ragged,ragged:24", "--stagger", "2", "--out", str(out)]
    result = concurrency_paired.main(argv)
    portable, ragged = result["runs"]["portable"][8][0], result["runs"]["ragged"][8][0]
    # [runtime] fold_padding 24: a folded prompt feeds pieces of several tokens (at most 1 + 24 //
    # rows, the padding budget) beside the decoding rows, so it takes fewer steps than one token
    # per step (padding 0, where such a step has width 1 and counts as a decode step).
    padded = result["runs"]["ragged:24"][8][0]
    assert any(rows > 1 and 1 < width <= 1 + 24 // rows for rows, width in padded["prefill_shapes"])
    assert padded["decode_steps"] < ragged["decode_steps"]
    alone = [s for s in portable["prefill_shapes"] if s[0] == 1]
    assert len(alone) == 8  # every arrival prefilled in a forward of its own
    # folded: wider forwards; alone only when no other row was running
    assert len([s for s in ragged["prefill_shapes"] if s[0] == 1]) < len(alone)
    assert any(s[0] > 1 for s in ragged["prefill_shapes"])
    assert ragged["ttft_s_median"] > 0 and "TTFT" in out.with_suffix(".md").read_text()


def test_two_bundles_in_the_same_rounds(
    tiny_fused_padded: Path, tiny_fused_unpadded: Path, tmp_path: Path
) -> None:
    """Old vs new export of one recipe: every bundle on every graph in each round, labelled by
    folder, with each label's throughput as a ratio to the first's (round by round)."""
    out = tmp_path / "pair"
    argv = [str(tiny_fused_unpadded), str(tiny_fused_padded), "--rounds", "2", "--new-tokens", "6"]
    result = concurrency_paired.main([*argv, "--threads", "1", "--graphs", "portable", "--out", str(out)])
    labels = ["tiny-fused-unpadded/portable", "tiny-fused-padded/portable"]
    assert result["graphs"] == labels and result["bundles"] == argv[:2]
    # The padded portable graph batches (its batched steps run unpadded): one 8-row prefill, 5 steps.
    for label in labels:
        assert [r["prefill_shapes"][0][0] for r in result["runs"][label][8]] == [8, 8]
        assert [r["decode_steps"] for r in result["runs"][label][8]] == [5, 5]
    ratios = result["vs_first"][labels[1]]
    assert len(ratios["tok_s_8_ratio_per_round"]) == 2 and ratios["tok_s_8_ratio_median"] > 0
    assert f"{labels[1]} / {labels[0]}" in out.with_suffix(".md").read_text()
