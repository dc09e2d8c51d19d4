"""`[target]` / --target: each target gets the graph its onnxruntime build runs, or a clear refusal."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from edge_llm.errors import ExportError
from export import targets
from export.fix_shapes import FixShapesConfig
from export.quantize import QuantizeConfig
from export.recipe import Recipe
from export.targets import TargetConfig


def test_unknown_target_refused() -> None:
    with pytest.raises(ValueError, match=r"target\.name must be one of cpu, openvino, qnn-htp, cuda"):
        TargetConfig("npu")


def test_cpu_and_cuda_keep_the_recipe() -> None:
    for name in ("cpu", "cuda"):
        recipe = Recipe(target=TargetConfig(name))
        assert targets.adapt(recipe) == recipe


def test_openvino_gets_the_optimum_graph_with_fp32_embeddings() -> None:
    out = targets.adapt(Recipe(target=TargetConfig("openvino")))
    assert out.to_onnx.graph == "optimum" and out.quantize.embeddings == "fp32"
    assert out.quantize.mode == "int8"  # MatMulNBits runs on OpenVINO (measured)
    fused = Recipe(target=TargetConfig("openvino"))
    fused = replace(fused, to_onnx=replace(fused.to_onnx, graph="fused"))
    with pytest.raises(ExportError, match="GroupQueryAttention"):
        targets.adapt(fused)


def test_qnn_htp_needs_static_qdq() -> None:
    with pytest.raises(ExportError, match=r"\[static\]"):
        targets.adapt(Recipe(target=TargetConfig("qnn-htp")))
    ok = Recipe(
        target=TargetConfig("qnn-htp"),
        quantize=QuantizeConfig(mode="qdq", calib_text=Path("calib.txt")),
        static=FixShapesConfig(past_length=64, prefill_length=16),
    )
    assert targets.adapt(ok) == ok


def test_only_the_openvino_target_records_provider_options() -> None:
    """OpenVINO's CPU default quantizes int8-weight MatMul activations on the fly, which flipped
    SmolLM2's answer: the openvino target's bundle asks for precision ACCURACY."""
    assert targets.provider_options("openvino") == {"openvino": {"precision": "ACCURACY"}}
    for name in ("cpu", "qnn-htp", "cuda"):
        assert targets.provider_options(name) == {}
    from edge_llm.providers import ProviderSpec, ort_options

    for name, opts in targets.provider_options("openvino").items():
        ort_options(ProviderSpec(name, opts))  # options the runtime accepts
