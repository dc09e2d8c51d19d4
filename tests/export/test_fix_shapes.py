"""Fixed-shape graphs for NPUs (`[static]`): numeric shapes only, and the same numbers as the
dynamic graph they came from, through the runtime's static KV layout (chunked, padded prefill)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_llm.engine import Engine
from edge_llm.errors import ConfigError, ContextLengthError
from edge_llm.sampling import SamplingParams
from export import recipe as recipe_mod
from export.evaluate import bundle_logits
from export.fix_shapes import FixShapesConfig
from export.load import LoadConfig
from export.quantize import QuantizeConfig
from tests.conftest import TRAIN_TEXT

PAST, CHUNK = 96, 16


def _build(tiny_hf: Path, out: Path, quant: QuantizeConfig, static: bool, fp16_norm: bool = True) -> Path:
    recipe = recipe_mod.Recipe(
        name="tiny-static" if static else "tiny-dynamic",
        load=LoadConfig(model=str(tiny_hf)),
        quantize=quant,
        static=FixShapesConfig(past_length=PAST, prefill_length=CHUNK, fp16_norm=fp16_norm)
        if static
        else None,
    )
    return recipe_mod.run(recipe, out)


@pytest.fixture(scope="module")
def static_fp32(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tiny_hf, tmp_path_factory.mktemp("static") / "fp32", QuantizeConfig(mode="none"), True)


def test_every_dimension_is_numeric_and_presents_hold_new_positions(static_fp32: Path) -> None:
    import onnx

    manifest = json.loads((static_fp32 / "bundle.json").read_text())
    graph = manifest["graph"]
    assert graph["kv_layout"] == "static" and graph["prefill_file"] == "prefill.onnx"
    assert (graph["past_length"], graph["prefill_length"]) == (PAST, CHUNK)
    assert manifest["architecture"]["context_length"] == PAST
    for name, steps in (("model.onnx", 1), ("prefill.onnx", CHUNK)):
        g = onnx.load(str(static_fp32 / name), load_external_data=False).graph
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*g.input, *g.output)}
        assert all(all(d > 0 for d in dims) for dims in shapes.values()), shapes
        assert shapes["input_ids"] == [1, steps]
        assert shapes["attention_mask"] == [1, PAST + steps]
        assert shapes["past_key_values.0.key"] == [1, 2, PAST, 16]
        assert shapes["present.0.key"] == [1, 2, steps, 16]
        assert shapes["logits"] == [1, steps, 384]
    # one weight file shared by both graphs
    assert [p.name for p in static_fp32.glob("*.data")] == ["model.onnx.data"]


def test_static_scores_like_the_dynamic_graph(static_fp32: Path, tiny_bundle: Path) -> None:
    # 50 tokens = 3 full prefill chunks + a padded chunk of 2: every path of the runner
    ids = np.random.default_rng(0).integers(3, 380, size=50)
    ref = bundle_logits(Engine.load(tiny_bundle))(ids)
    got = bundle_logits(Engine.load(static_fp32))(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4


def test_static_generates_the_same_tokens(static_fp32: Path, tiny_bundle: Path) -> None:
    dynamic, static = Engine.load(tiny_bundle), Engine.load(static_fp32)
    prompt = dynamic.encode_request(prompt=TRAIN_TEXT[0])
    for params in (
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3),
    ):
        assert static.complete(prompt, params).token_ids == dynamic.complete(prompt, params).token_ids


def test_static_refuses_more_than_its_past(static_fp32: Path) -> None:
    engine = Engine.load(static_fp32)
    assert engine.max_context == PAST
    with pytest.raises(ContextLengthError):
        engine.check_length(PAST - 10, 20)
    with pytest.raises(ContextLengthError):
        engine.score(list(range(3, 3 + PAST + 1)))


def test_static_qdq16_matches_its_dynamic_graph(tiny_hf: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("\n".join(TRAIN_TEXT), encoding="utf-8")
    quant = QuantizeConfig(
        mode="qdq", activation_bits=16, calib_tokens=256, calib_seq_len=32, calib_text=text, calib_span=(0, 1)
    )
    dynamic = _build(tiny_hf, tmp_path / "dyn", quant, False)
    # fp16_norm off: its rewrite is exact in fp32 (the fp32 test above, tests/export/
    # test_fp16_norm.py) up to fp32 rounding, which is enough to flip a uint16 rounding step
    # of the QDQ graph's next QuantizeLinear (measured: logits then differ by up to 0.095).
    static = _build(tiny_hf, tmp_path / "static", quant, True, fp16_norm=False)
    ids = np.random.default_rng(1).integers(3, 380, size=40)
    ref = bundle_logits(Engine.load(dynamic))(ids)
    got = bundle_logits(Engine.load(static))(ids)
    # Same QDQ weights and ranges; masked past positions add exact zeros (measured: identical).
    assert np.abs(got - ref).max() < 1e-4
    assert json.loads((static / "bundle.json").read_text())["quantization"]["mode"] == "qdq"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("[static]\npast_length = 64\nprefill_length = 128\n", "prefill_length"),
        ("[static]\npast_length = 8\n", "past_length"),
        ("[static]\n[quantize]\nmode = 'int8'\n", r"\[static\].*optimum"),
        ("[static]\n[to_onnx]\ngraph = 'fused'\n[quantize]\nmode = 'none'\n", r"\[static\].*optimum"),
        ("[static]\nchunk = 3\n", "unknown key.*chunk"),
    ],
)
def test_bad_static_section(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match):
        recipe_mod.load_recipe(path)


def test_static_bundle_without_its_prefill_graph_is_refused(static_fp32: Path, tmp_path: Path) -> None:
    import shutil

    from edge_llm.bundle import load_bundle
    from edge_llm.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(static_fp32, copy)
    (copy / "prefill.onnx").unlink()
    with pytest.raises(BundleError, match=r"prefill\.onnx.*missing"):
        load_bundle(copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    del manifest["files"]["prefill.onnx"]
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"prefill\.onnx is not listed"):
        load_bundle(copy)
