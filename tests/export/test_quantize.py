"""Every quantization mode on a tiny random Llama: the runtime loads the graph and it agrees with fp32.

Tolerances, on 48 positions of random tokens (this random model's logits span about -6.5..6,
and its large `initializer_range` amplifies weight error: 0.5% RMS per weight gives ~0.05 mean
|Δlogit|; measured values in brackets):
- int8 / grid (MatMulNBits, accuracy_level 4: int8 activations in the kernel), + 8-bit
  embedding: mean |Δ| ≤ 0.08 [0.052], max |Δ| ≤ 0.6 (5% of the range) [0.44], top-1 ≥ 85% [92%].
- dynamic (int8 per-channel weights, uint8 per-tensor activations at run time): mean ≤ 0.12
  [0.074], max ≤ 0.9 [0.63], top-1 ≥ 85% [90%].
- qdq (uint8 activations with static MinMax ranges from calibration text): mean ≤ 0.2 [0.11],
  max ≤ 1.5 [1.03], top-1 ≥ 80% [90%]. Static ranges are the coarsest, as on real models.
- qdq with 16-bit activations: as int8 [mean 0.058, max 0.48, top-1 92%].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_llm.engine import Engine
from export import quantize
from export import recipe as recipe_mod
from export.evaluate import bundle_logits
from export.load import LoadConfig

CASES = {
    "int8": (quantize.QuantizeConfig(mode="int8"), 0.08, 0.6, 0.85),
    "grid": (quantize.QuantizeConfig(mode="grid"), 0.08, 0.6, 0.85),
    "int8-embed": (quantize.QuantizeConfig(mode="int8", embeddings="int8"), 0.08, 0.6, 0.85),
    # 7-bit weights (reduce_range, the default): measured max 1.00 on an AVX2-only host; with 8-bit
    # weights there the u8 x s8 int16 saturation put the mean at 0.43 and the max at 3.2.
    "dynamic": (quantize.QuantizeConfig(mode="dynamic"), 0.12, 1.2, 0.85),
    "qdq": (quantize.QuantizeConfig(mode="qdq", calib_tokens=256, calib_seq_len=32), 0.2, 1.5, 0.8),
    "qdq16": (
        quantize.QuantizeConfig(mode="qdq", activation_bits=16, calib_tokens=256, calib_seq_len=32),
        0.08,
        0.6,
        0.85,
    ),
}


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 380, size=48)


def _build(tiny_hf: Path, out: Path, cfg: quantize.QuantizeConfig) -> Path:
    recipe = recipe_mod.Recipe(name="tiny-q", load=LoadConfig(model=str(tiny_hf)), quantize=cfg)
    return recipe_mod.run(recipe, out)


@pytest.mark.parametrize("case", list(CASES))
def test_mode_loads_and_agrees_with_fp32(
    case: str, tiny_hf: Path, tiny_bundle: Path, tiny_text: Path, tmp_path: Path, ids: np.ndarray
) -> None:
    cfg, mean_tol, max_tol, agree = CASES[case]
    if cfg.mode == "qdq":
        cfg = quantize.QuantizeConfig(**{**cfg.__dict__, "calib_text": tiny_text, "calib_span": (0.0, 1.0)})
    bundle = _build(tiny_hf, tmp_path / case, cfg)
    ref = bundle_logits(Engine.load(tiny_bundle))(ids)
    got = bundle_logits(Engine.load(bundle))(ids)
    diff = np.abs(got - ref)
    assert diff.mean() <= mean_tol and diff.max() <= max_tol, (diff.mean(), diff.max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= agree
    method = json.loads((bundle / "bundle.json").read_text())["quantization"]
    assert method["weights"] > 0 and method["worst_rel_rms"] < 0.05
    if cfg.mode in ("dynamic", "qdq"):  # 7-bit weights wherever activations are 8-bit
        assert method["reduce_range"] is (cfg.mode == "dynamic" or cfg.activation_bits == 8)
    report = quantize.read_report(_qdir(bundle))
    assert report["errors"] and all("max_abs" in e for e in report["errors"].values())


def _qdir(bundle: Path) -> Path:
    """The quantize stage folder this bundle came from (its report holds every tensor's error)."""
    from export.cache import cache_root

    manifest = json.loads((bundle / "bundle.json").read_text())
    for folder in (cache_root() / "stages").glob("quantize-*"):
        report = folder / quantize.REPORT
        if report.is_file() and quantize.read_report(folder)["method"] == manifest["quantization"]:
            return folder
    raise AssertionError("no quantize stage folder for this bundle")


def test_embedding_gather_becomes_8bit(tiny_hf: Path, tmp_path: Path) -> None:
    import onnx

    bundle = _build(tiny_hf, tmp_path / "e", quantize.QuantizeConfig(mode="int8", embeddings="int8"))
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "GatherBlockQuantized" in ops
    assert not any(n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight" for n in graph.node)


def test_exact_activations_pick_matmuls_by_name(tiny_hf: Path, tmp_path: Path) -> None:
    """exact_activations: the named MatMuls run with accuracy_level 0, the others at the recipe's."""
    import onnx

    cfg = quantize.QuantizeConfig(mode="int8", exact_activations=("lm_head", "down_proj"))
    bundle = _build(tiny_hf, tmp_path / "x", cfg)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    levels = {
        n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    exact = {n for n in levels if "lm_head" in n or "down_proj" in n}
    assert exact and len(exact) < len(levels)
    assert all(levels[n] == (0 if n in exact else 4) for n in levels), levels
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["quantization"]["exact_activations"] == ["lm_head", "down_proj"]


def test_bad_quantize_config() -> None:
    with pytest.raises(ValueError, match=r"quantize\.mode"):
        quantize.QuantizeConfig(mode="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        quantize.QuantizeConfig(block_size=48)


@pytest.mark.parametrize(
    ("mode", "asked", "got"),
    [("int8", "auto", "int8"), ("grid", "auto", "int8"), ("none", "auto", "fp32"), ("qdq", "auto", "fp32"),
     ("dynamic", "auto", "fp32"), ("int8", "fp32", "fp32"), ("none", "int8", "int8")],
)  # fmt: skip
def test_embeddings_auto_follows_the_mode(mode: str, asked: str, got: str) -> None:
    assert quantize.embeddings(quantize.QuantizeConfig(mode=mode, embeddings=asked)) == got  # type: ignore[arg-type]
