"""Stage 4, to_onnx: a Hugging Face folder in, an fp32 ONNX decoder with a KV cache out.

`graph = "optimum"`: optimum's exporter (task text-generation-with-past): input_ids,
attention_mask, position_ids and past_key_values.{i}.key/value in; logits for every position and
present.{i}.key/value out — the "concat" KV layout of bundle.json (past copied into present).
`graph = "fused"`: `export/fuse.py` writes ONNX Runtime's fused decoder (GroupQueryAttention over
a preallocated KV buffer shared by past and present, fused norms) straight from the weights — the
"shared" layout, about half the per-token cost on CPU. Both are fp32 here; `quantize` follows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from edge_llm.errors import ExportError
from export.cache import stable_key
from export.stage import Artifact, Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToOnnxConfig:
    # "auto": fused when export/fuse.py supports the architecture (Llama, Mistral, Qwen2), else optimum
    graph: Literal["auto", "optimum", "fused"] = "auto"
    task: str = "text-generation-with-past"
    opset: int | None = None
    validate: bool = False  # optimum's own check; evaluate.py measures agreement instead
    max_context: int = 2048  # fused: rotary table rows, the largest KV buffer the graph serves
    # fused: "tail" = the last `logits_to_keep` positions per row, a runtime input (1 to decode,
    # k+1 to verify a speculative draft, S to score); "last" = 1 always; "all" = every position.
    logits: Literal["last", "all", "tail"] = "tail"
    # optimum: keep torch's Where(IsNaN(softmax), 0, softmax) after each attention softmax. The
    # openvino target drops it (export/nan_guard.py says why that is safe): OpenVINO has no IsNaN.
    nan_guard: bool = True

    def __post_init__(self) -> None:
        if self.graph not in ("auto", "optimum", "fused"):
            raise ValueError(f"to_onnx.graph must be 'auto', 'optimum' or 'fused', not {self.graph!r}")
        if self.max_context < 16:
            raise ValueError("to_onnx.max_context must be ≥ 16")


LAYOUT = "graph.json"  # written beside the graph: what the bundle stage records in bundle.json
STAGE_VERSION = 3  # part of the cache key: 2 lacked graph.json; 3: fused GQA without a 17th input


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


def choose_graph(config: ToOnnxConfig, hf_dir: Path) -> str:
    if config.graph != "auto":
        return config.graph
    from export import fuse

    model_type = json.loads((hf_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    return "fused" if model_type in fuse.SUPPORTED_TYPES else "optimum"


def read_layout(out_dir: Path) -> dict[str, Any]:
    """{"graph", "kv_layout", "logits", "context_length"} of a to_onnx output folder."""
    return json.loads((out_dir / LAYOUT).read_text(encoding="utf-8"))


def run(config: ToOnnxConfig, hf_dir: Path, out_dir: Path) -> OnnxResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = choose_graph(config, hf_dir)
    if graph == "fused":
        from export import fuse

        fcfg = fuse.FuseConfig(max_context=config.max_context, logits=config.logits)
        fused = fuse.run(fcfg, hf_dir, out_dir)
        layout = {
            "graph": "fused",
            "kv_layout": "shared",
            "logits": config.logits,
            "context_length": config.max_context,
        }
        (out_dir / LAYOUT).write_text(json.dumps(layout) + "\n")
        return OnnxResult(fused.model_path, fused.inputs, fused.outputs)
    from optimum.exporters.onnx import main_export

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
    if not config.nan_guard:
        _drop_nan_guard(model_path)
    inputs, outputs = graph_io(model_path)
    layout = {"graph": "optimum", "kv_layout": "concat", "logits": "all", "context_length": 0}
    (out_dir / LAYOUT).write_text(json.dumps(layout) + "\n")
    return OnnxResult(model_path, inputs, outputs)


def _drop_nan_guard(model_path: Path) -> None:
    import onnx

    from export import nan_guard

    model = onnx.load(str(model_path), load_external_data=False)  # weights stay where they are
    dropped = nan_guard.drop(model)
    log.info("to_onnx: %d NaN guards dropped", dropped)
    onnx.save(model, str(model_path))


# --------------------------------------------------------------------------- as a recipe stage


def key(config: ToOnnxConfig, art: Artifact) -> str:
    # Flattened into the input's key parts: straight after load that is (load config, source),
    # the key unpruned exports have always had, so their cached graphs stay valid. nan_guard came
    # later: a config that keeps it (the default) hashes as the same config did before.
    cfg: Any = config
    if config.nan_guard:
        cfg = {"__type__": type(config).__name__, **asdict(config)}
        del cfg["nan_guard"]
    return stable_key(*art.key_parts, cfg, STAGE_VERSION)


def build(config: ToOnnxConfig, art: Artifact, out: Path, progress: bool) -> None:
    run(config, art.hf_dir, out)


def result(config: ToOnnxConfig, art: Artifact, folder: Path) -> Artifact:
    layout = read_layout(folder)
    spec = {"kv_layout": layout["kv_layout"], "logits": layout["logits"]}
    return replace(
        art,
        graph=folder / "model.onnx",
        layout={**spec, "context_length": layout["context_length"]},
        facts={"graph": layout["graph"], **spec},
    )


STAGE = Stage("to_onnx", build, result, key=key)
