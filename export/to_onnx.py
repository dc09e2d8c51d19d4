"""Stage 4, to_onnx: a Hugging Face folder in, an fp32 ONNX decoder with a KV cache out.

Uses optimum's exporter (task text-generation-with-past): one graph taking input_ids,
attention_mask, position_ids and past_key_values.{i}.key/value, returning logits for every
position and present.{i}.key/value (the "concat" KV layout of bundle.json).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edge_llm.errors import ExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToOnnxConfig:
    task: str = "text-generation-with-past"
    opset: int | None = None
    validate: bool = False  # optimum's own check; evaluate.py measures agreement instead


@dataclass(frozen=True)
class OnnxResult:
    model_path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_io(model_path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of a graph, without loading its weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in inits)
    return inputs, tuple(o.name for o in model.graph.output)


def run(config: ToOnnxConfig, hf_dir: Path, out_dir: Path) -> OnnxResult:
    from optimum.exporters.onnx import main_export

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        main_export(
            str(hf_dir),
            output=str(out_dir),
            task=config.task,
            opset=config.opset,
            do_validation=config.validate,
            no_post_process=True,
            device="cpu",
        )
    except Exception as exc:  # optimum raises plain ValueError/RuntimeError/KeyError alike
        raise ExportError(f"optimum could not export {hf_dir}: {type(exc).__name__}: {exc}") from exc
    model_path = out_dir / "model.onnx"
    if not model_path.is_file():
        raise ExportError(f"optimum wrote no model.onnx into {out_dir}")
    inputs, outputs = graph_io(model_path)
    return OnnxResult(model_path, inputs, outputs)
