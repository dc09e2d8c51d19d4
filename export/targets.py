"""Export targets: which graph each ONNX Runtime build runs well, and what a graph needs.

`[target] name = "cpu" | "openvino" | "qnn-htp" | "cuda"` in a recipe (or `edge-llm export
--target`) picks the graph the bundle carries and is recorded in bundle.json `requirements`,
together with the lowest onnxruntime that runs every op of the written graph(s).

The table below is what was run, not read from release notes: each contrib op as this exporter
writes it (attributes, input count) was loaded and run on the onnxruntime CPU builds listed in
`VERIFIED_ORT`; the value is the lowest of those on which it ran (tests/edge_llm/
test_ort_versions.py re-runs the tiny fused bundle on the old build when its venv is present).
An op missing from the table gets the version of the exporting onnxruntime: never verified
older, so never claimed older.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_llm.bundle import PORTABLE_CPU_ORT, version_tuple

TARGETS = ("cpu", "openvino", "qnn-htp", "cuda")

# onnxruntime CPU builds the table was measured on (Python 3.11 wheels, this machine). The int8
# fused graph runs on the last three; 1.20.1, 1.21.1 and 1.22.1 refuse it at load
# ("Unrecognized attribute: bits for operator GatherBlockQuantized").
VERIFIED_ORT = ("1.20.1", "1.21.1", "1.22.1", "1.23.2", "1.31.1", "1.32.0")

# "domain:op" -> lowest verified onnxruntime that runs it as export/fuse.py and export/nbits.py
# write it. Standard ONNX ops (opset 21, IR 10) all ran on the oldest build tested.
OP_MIN_ORT: dict[str, str] = {
    "com.microsoft:GroupQueryAttention": "1.23.2",  # 9 inputs: rotary inside, shared KV buffer
    "com.microsoft:MatMulNBits": "1.23.2",  # bits 8, accuracy_level 4
    "com.microsoft:GatherBlockQuantized": "1.23.2",  # with `bits`: 1.22.1 refuses the attribute
    "com.microsoft:SkipSimplifiedLayerNormalization": "1.23.2",
    "com.microsoft:QuickGelu": "1.23.2",
    ":SimplifiedLayerNormalization": "1.23.2",  # a contrib kernel registered in the ONNX domain
}
# (op, input count) -> lowest version: inputs a newer build added to an existing op.
# 1.31.1 refuses GQA with 17 inputs ("input size 17 not in range [min=7, max=16]"); 1.32.0 runs it.
# 14 inputs (an int8 KV cache with k_scale / v_scale, export/variants.py): ran on 1.31.1 and
# 1.32.0 with the same logits (the tiny bundle, 2026-12-04); 1.23.2 not tried, so not claimed.
INPUTS_MIN_ORT: dict[tuple[str, int], str] = {
    ("com.microsoft:GroupQueryAttention", 17): "1.32.0",
    ("com.microsoft:GroupQueryAttention", 14): "1.31.1",
}
# Ops of the ONNX domain that are onnxruntime contrib kernels, not ONNX standard ops.
CONTRIB_IN_ONNX_DOMAIN = frozenset({"SimplifiedLayerNormalization"})


@dataclass(frozen=True)
class TargetConfig:
    """`[target]` of a recipe: the onnxruntime build (execution provider) the bundle is for."""

    name: str = "cpu"
    # qnn-htp: the QNN SoC id the context binary is compiled for (0: export/compile_qnn.py's
    # default, 57 = SM8650); a context binary runs on that Hexagon generation.
    soc_model: int = 0

    def __post_init__(self) -> None:
        if self.name not in TARGETS:
            raise ValueError(f"target.name must be one of {', '.join(TARGETS)}, not {self.name!r}")
        if self.soc_model and self.name != "qnn-htp":
            raise ValueError("target.soc_model is for target qnn-htp (the QNN context binary)")
        if self.soc_model < 0:
            raise ValueError("target.soc_model must be a QNN SoC id (> 0)")


# bundle.json `provider_options` per target: the execution-provider settings the target's graph
# was measured with, applied by the runtime beneath a board profile's (edge_llm.providers).
# openvino, precision ACCURACY: with its default (FP32) the OpenVINO CPU plugin quantizes the
# activations of int8-weight MatMuls to int8 on the fly (DYNAMIC_QUANTIZATION_GROUP_SIZE 32), and
# SmolLM2's first answer token to "What is the capital of France?" flipped from "The" (+0.17 with
# fp32 activations) to "L" (-0.18): "L'Étoile…" instead of Paris. ACCURACY (execution mode
# ACCURACY) turns that off; its logits there equalled DYNAMIC_QUANTIZATION_GROUP_SIZE 0's to 5
# decimals (benchmarks/openvino_precision.py, onnxruntime-openvino 1.24.1 / OpenVINO 2025.4.1). Valid on
# every OpenVINO device (CPU, GPU, NPU).
PROVIDER_OPTIONS: dict[str, dict[str, dict[str, str]]] = {
    "openvino": {"openvino": {"precision": "ACCURACY"}},
}


def provider_options(target: str) -> dict[str, dict[str, str]]:
    """bundle.json `provider_options` for a bundle built for `target` (empty: EP defaults)."""
    return {name: dict(opts) for name, opts in PROVIDER_OPTIONS.get(target, {}).items()}


def compile_config(recipe: Any) -> Any:
    """The compile_qnn stage's config for a qnn-htp recipe (None for other targets: skipped)."""
    if recipe.target.name != "qnn-htp":
        return None
    from export.compile_qnn import DEFAULT_SOC, CompileConfig

    return CompileConfig(soc_model=recipe.target.soc_model or DEFAULT_SOC)


def _op_key(domain: str, op_type: str) -> str:
    return f"{'' if domain in ('', 'ai.onnx') else domain}:{op_type}"


def graph_ops(paths: Iterable[Path]) -> list[tuple[str, int]]:
    """("domain:op", input count) of every node of the graphs (weights not loaded)."""
    import onnx

    out = []
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        for node in model.graph.node:
            inputs = len(node.input)
            while inputs and not node.input[inputs - 1]:  # trailing empty inputs are absent
                inputs -= 1
            out.append((_op_key(node.domain, node.op_type), inputs))
    return out


def requirements(paths: Iterable[Path], target: str, exporting_ort: str | None = None) -> dict[str, Any]:
    """bundle.json `requirements` of the graphs in `paths` for `target`."""
    if exporting_ort is None:
        import onnxruntime

        exporting_ort = onnxruntime.__version__
    need = PORTABLE_CPU_ORT
    contrib: set[str] = set()
    for key, inputs in graph_ops(paths):
        domain, op = key.split(":", 1)
        if domain == "" and op not in CONTRIB_IN_ONNX_DOMAIN:
            continue
        contrib.add(key)
        for version in (OP_MIN_ORT.get(key, exporting_ort), INPUTS_MIN_ORT.get((key, inputs), "0")):
            if version_tuple(version) > version_tuple(need):
                need = version
    return {"onnxruntime": need, "contrib_ops": sorted(contrib), "target": target}


def adapt(recipe: Any) -> Any:
    """The recipe with what its target needs filled in (a `Recipe`; refuses what cannot work).

    cpu / cuda: the fused graph (GroupQueryAttention, MatMulNBits: both have CPU and CUDA kernels).
    openvino: the optimum graph (standard attention ops) with fp32 embeddings and no NaN guard
        after the softmax: on OpenVINOExecutionProvider 1.24.1 the fused graph's
        GroupQueryAttention and GatherBlockQuantized fall back to CPU (measured: 31 CPU nodes for
        SmolLM2, one per layer + the embedding, splitting the graph into 31 OpenVINO subgraphs),
        and so does the optimum graph's IsNaN (30 nodes); MatMulNBits runs on OV.
    qnn-htp: fixed shapes ([static]) with QDQ quantization: what the HTP compiles; the
        compile_qnn stage then compiles them into QNN context binaries (EPContext models).
    """
    from dataclasses import replace

    from edge_llm.errors import ExportError

    name = recipe.target.name
    if name == "openvino":
        if recipe.to_onnx.graph == "fused":
            raise ExportError(
                "target openvino: the fused graph's GroupQueryAttention and GatherBlockQuantized run on "
                "CPU under OpenVINO; use to_onnx.graph 'optimum' or 'auto'"
            )
        quantize = recipe.quantize
        if quantize.embeddings in ("auto", "int8"):
            quantize = replace(quantize, embeddings="fp32")
        # without the per-layer IsNaN guard, which OpenVINO runs on CPU (export/nan_guard.py)
        to_onnx = replace(recipe.to_onnx, graph="optimum", nan_guard=False)
        return replace(recipe, to_onnx=to_onnx, quantize=quantize)
    if name == "qnn-htp" and (recipe.static is None or recipe.quantize.mode != "qdq"):
        raise ExportError(
            "target qnn-htp: the HTP runs fixed shapes of QDQ ops: add [static] (or --static PAST,PREFILL) "
            "and quantize.mode 'qdq'"
        )
    return recipe
