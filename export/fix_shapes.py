"""Stage 5b, fix_shapes: a dynamic-shape decoder in, a decode and a prefill graph of fixed shapes out.

NPUs such as Qualcomm's HTP (ONNX Runtime's QNN provider) compile a graph ahead of time for one
set of shapes, so the growing past of the "concat" layout cannot run there. This stage takes an
optimum-layout graph (typically the QDQ one from `quantize`):

    input_ids [B, S], attention_mask [B, P + S], position_ids [B, S],
    past_key_values.{i}.key/value [B, kv, P, d]  ->  logits [B, S, V], present.{i}.* [B, kv, P + S, d]

and writes into `out_dir`, sharing one weight file `model.onnx.data`:
- `model.onnx`: decode, B = 1, S = 1, P = `past_length`;
- `prefill.onnx`: B = 1, S = `prefill_length`, P = `past_length`.
Every input and output then has numeric dimensions only, and each present output keeps only the
S new positions ([1, kv, S, d], a Slice after the graph's concat): the runtime copies S positions
per step instead of the whole past. RMSNorms are rewritten to stay within fp16's range
(`fp16_norm`, on by default; see export/fp16_norm.py), as NPUs run a QDQ graph's fp32 ops in fp16.
The runtime's "static" KV layout keeps one [1, kv, P, d]
buffer per layer, masks its unused positions with attention_mask, and runs a prompt as
right-padded chunks of `prefill_length` (see `edge_llm/runner.py` StaticRunner).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge_llm.errors import ExportError
from export import fp16_norm
from export.onnx_graph import link_or_copy
from export.stage import Artifact, Stage, chain_key

REPORT = "fix_shapes.json"
DATA = "model.onnx.data"
# optimum's names for the dynamic dimensions of its decoder export
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQ}"


@dataclass(frozen=True)
class FixShapesConfig:
    past_length: int = 512  # KV positions the graphs attend over: the bundle's context length
    prefill_length: int = 64  # prompt tokens per prefill call (the last chunk is right-padded)
    # RMSNorm computed on 8·x / max|x| (export/fp16_norm.py): NPUs such as QNN's HTP run the fp32
    # ops a QDQ graph leaves in fp16, where SmolLM2's x² overflows (its residual reaches 24,926).
    fp16_norm: bool = True

    def __post_init__(self) -> None:
        if not 16 <= self.past_length <= 32768:
            raise ValueError("static.past_length must be in 16..32768")
        if not 2 <= self.prefill_length <= self.past_length:
            raise ValueError("static.prefill_length must be in 2..past_length")


@dataclass(frozen=True)
class FixShapesResult:
    model_path: Path  # decode graph
    prefill_path: Path


def run(config: FixShapesConfig, model_path: Path, out_dir: Path) -> FixShapesResult:
    """Write `out_dir/model.onnx` (decode) and `out_dir/prefill.onnx` over a shared weight file."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    source = onnx.load(str(model_path), load_external_data=False)
    _check_layout(source, model_path)
    locations = {e.value for t in source.graph.initializer for e in t.external_data if e.key == "location"}
    if len(locations) > 1:
        raise ExportError(f"{model_path}: weights in several files {sorted(locations)}; expected one")
    if locations and locations != {DATA}:
        raise ExportError(
            f"{model_path}: weights in {locations.pop()!r}, expected {DATA!r} (quantize's layout)"
        )
    if locations:
        link_or_copy(model_path.with_name(DATA), out_dir / DATA)
    norms = fp16_norm.rewrite(source) if config.fp16_norm else 0
    paths = {}
    for name, steps in (("model.onnx", 1), ("prefill.onnx", config.prefill_length)):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        fix(model, config.past_length, steps)
        onnx.save(model, str(out_dir / name))  # external tensors stay references to DATA
        paths[name] = out_dir / name
    (out_dir / REPORT).write_text(json.dumps({**asdict(config), "fp16_norms": norms}) + "\n")
    return FixShapesResult(paths["model.onnx"], paths["prefill.onnx"])


def fix(model: Any, past: int, steps: int) -> None:
    """In place: batch 1, `steps` new tokens over `past` positions; presents keep the new ones."""
    from onnx import TensorProto, helper
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    graph = model.graph
    for param, value in ((BATCH, 1), (SEQ, steps), (PAST, past), (TOTAL, past + steps)):
        make_dim_param_fixed(graph, param, value)  # inputs, outputs and value_info alike
    consts = [
        helper.make_tensor(f"fix_shapes_{n}", TensorProto.INT64, [1], [v])
        for n, v in (("start", past), ("end", past + steps), ("axis", 2))
    ]
    graph.initializer.extend(consts)
    for out in graph.output:
        if not out.name.startswith("present."):
            continue
        full = out.name + ".full"
        for node in graph.node:
            node.output[:] = [full if o == out.name else o for o in node.output]
            node.input[:] = [full if i == out.name else i for i in node.input]
        graph.node.append(
            helper.make_node(
                "Slice", [full, *(c.name for c in consts)], [out.name], name=f"fix_shapes_slice_{out.name}"
            )
        )
        out.type.tensor_type.shape.dim[2].dim_value = steps
    left = [
        f"{v.name}[{i}]={d.dim_param}"
        for v in (*graph.input, *graph.output)
        for i, d in enumerate(v.type.tensor_type.shape.dim)
        if not d.HasField("dim_value")
    ]
    if left:
        raise ExportError(f"dimensions still dynamic after fixing: {', '.join(left)}")


def _check_layout(model: Any, path: Path) -> None:
    names = {i.name for i in model.graph.input}
    need = {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"}
    if not need <= names:
        raise ExportError(
            f"{path}: fix_shapes needs an optimum-layout decoder (inputs {sorted(need)}); "
            f"missing {sorted(need - names)}. Use to_onnx.graph = 'optimum'."
        )
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    dims = [d.dim_param for d in past.type.tensor_type.shape.dim]
    if dims[0] != BATCH or dims[2] != PAST:
        raise ExportError(f"{path}: past_key_values dims {dims}: not optimum's dynamic names")


# --------------------------------------------------------------------------- as a recipe stage


def build(config: FixShapesConfig, art: Artifact, out: Path, progress: bool) -> None:
    if art.graph is None:
        raise ExportError("static: no graph to fix (to_onnx and quantize must come first)")
    run(config, art.graph, out)


def result(config: FixShapesConfig, art: Artifact, folder: Path) -> Artifact:
    return replace(
        art,
        graph=folder / "model.onnx",
        extra_graphs={**art.extra_graphs, "prefill.onnx": folder / "prefill.onnx"},
        layout={
            **art.layout,
            "kv_layout": "static",
            "prefill_file": "prefill.onnx",
            "prefill_length": config.prefill_length,
            "past_length": config.past_length,
            "context_length": config.past_length,
        },
        facts={
            **asdict(config),
            "fp16_norms": json.loads((folder / REPORT).read_text()).get("fp16_norms", 0),
        },
    )


def key(config: FixShapesConfig, art: Artifact) -> str:
    # The rewrite's version joins the key when it runs: a graph an older rewrite wrote is rebuilt.
    return chain_key((config, fp16_norm.VERSION) if config.fp16_norm else config, art)


STAGE = Stage("fix_shapes", build, result, key=key)
