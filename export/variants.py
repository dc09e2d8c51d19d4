"""Stage variants (recipe `[fuse]`): a quantized fused graph in, the graphs the runtime chooses from out.

All graphs share one weight file (`model.onnx.data`, hard-linked from the quantize stage, never
rewritten): a variant is a small graph proto whose nodes read the same external tensors.

- `kv_cache = "int8"`: GroupQueryAttention keeps an int8 KV cache with static per-channel scales
  (one per KV head and channel, absmax / 127 over calibration text; K after rotary, as the cache
  holds it): a quarter of the KV bytes. `"both"`: the main graph keeps fp32 KV and an int8-KV
  variant rides along, so a board profile (`[runtime] kv_cache`) picks one. The onnxruntime CPU
  kernel takes float32 q/k/v with a float32 / int8 / uint8 cache (an fp16 cache needs fp16
  activations: the slower path on CPUs), so int8 is the compact format offered.
- `query_seqlens = true`: each graph also comes as a "ragged" variant whose GroupQueryAttention
  takes its 17th input, the new tokens of each row (onnxruntime >= 1.32 only; older builds
  refuse the node). Rows of one forward may then feed different numbers of tokens over
  different pasts: a newcomer's prompt joins the running rows' decode step. The portable graph
  stays the main one, so the bundle still loads on onnxruntime 1.23.2.

Out: `model.onnx` (+ `.data`), the variants, and `variants.json`: file -> {"kv_cache",
"query_seqlens"} (bundle.json `graph.variants`) with the calibration record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_llm.errors import ExportError
from export.onnx_graph import link_or_copy
from export.stage import Artifact, Stage
from export.text import check_span

GQA = "GroupQueryAttention"
K_SCALE, V_SCALE, QUERY_SEQLENS = 12, 13, 16  # GroupQueryAttention input positions (contrib schema)
RECORD = "variants.json"


@dataclass(frozen=True)
class FuseOptions:
    """`[fuse]` of a recipe: options of the fused graph (to_onnx.graph "fused")."""

    kv_cache: Literal["fp32", "int8", "both"] = "fp32"
    query_seqlens: bool = True  # also write each graph with GQA's query_seqlens (ORT >= 1.32)
    # int8 KV scales come from the cache over this text (required with int8 / both); the span
    # is kept apart from evaluation's.
    calib_text: Path | None = None
    calib_span: tuple[float, float] = (0.5, 1.0)
    calib_tokens: int = 4096
    calib_window: int = 1024  # tokens per calibration forward (positions the scales cover)

    def __post_init__(self) -> None:
        if self.kv_cache not in ("fp32", "int8", "both"):
            raise ValueError(f"fuse.kv_cache must be 'fp32', 'int8' or 'both', not {self.kv_cache!r}")
        check_span(self.calib_span, "fuse.calib_span")
        if self.calib_tokens < 2 or self.calib_window < 2:
            raise ValueError("fuse.calib_tokens and fuse.calib_window must be >= 2")
        if self.kv_cache != "fp32" and self.calib_text is None:
            raise ValueError("fuse.calib_text: an int8 KV cache is calibrated on text; give the file")


# --------------------------------------------------------------------------- graph rewrites


def add_query_seqlens(model: Any) -> None:
    """Give `model` (a graph written by export/fuse.py) the int32 `query_seqlens` [B] input:
    GQA's 17th input, and the row lengths the last-token gather reads (what
    FuseConfig(query_seqlens_input=True) builds)."""
    from onnx import TensorProto, helper

    g = model.graph
    lens = next((n for n in g.node if n.name == "qlens_i64"), None)
    if lens is None or not any(n.op_type == GQA for n in g.node):
        raise ExportError("query_seqlens: not a fused graph written by export/fuse.py (no qlens_i64 node)")
    if any(i.name == "query_seqlens" for i in g.input):
        return
    g.input.insert(2, helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, ["batch"]))
    # Min(mask sum, S) guessed each row's count; the input now says it.
    lens.op_type, lens.domain = "Cast", ""
    del lens.input[:]
    lens.input.append("query_seqlens")
    del lens.attribute[:]
    lens.attribute.append(helper.make_attribute("to", TensorProto.INT64))
    for node in g.node:
        if node.op_type == GQA:
            while len(node.input) < QUERY_SEQLENS:
                node.input.append("")
            node.input.append("query_seqlens")


def quantize_kv(model: Any, absmax: np.ndarray) -> None:
    """Make every GQA node of `model` keep an int8 cache with per-channel scales from `absmax`
    [layers, 2 (K, V), kv heads, head_dim]; the KV inputs and outputs become int8."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    for vi in [*g.input, *g.output]:
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.elem_type = TensorProto.INT8
    scale = np.maximum(absmax, 1e-6).astype(np.float32) / 127.0  # symmetric: round(x / s) in ±127
    nodes = [n for n in g.node if n.op_type == GQA]
    if len(nodes) != absmax.shape[0]:
        raise ExportError(f"kv_cache: {len(nodes)} GroupQueryAttention nodes, {absmax.shape[0]} calibrated")
    for layer, node in enumerate(nodes):
        while len(node.input) <= V_SCALE:
            node.input.append("")
        for pos, kind in ((K_SCALE, 0), (V_SCALE, 1)):
            name = f"layers.{layer}.attn.{'kv'[kind]}_scale"
            g.initializer.append(numpy_helper.from_array(scale[layer, kind][None, :, None, :], name))
            node.input[pos] = name
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )


def kv_absmax(graph: Path, ids: np.ndarray, window: int, threads: int = 0) -> np.ndarray:
    """absmax [layers, 2 (K, V), kv heads, head_dim] of the KV cache the fp32-KV `graph` writes
    over `ids`, fed in windows of `window` tokens from an empty cache."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    session = ort.InferenceSession(str(graph), sess_options=so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    past = sorted(
        (n for n in inputs if n.startswith("past_key_values.")),
        key=lambda n: (int(n.split(".")[1]), n.endswith(".value")),
    )
    presents = [n.replace("past_key_values.", "present.") for n in past]
    kv, d = inputs[past[0]].shape[1], inputs[past[0]].shape[3]
    out = np.zeros((len(past) // 2, 2, kv, d), np.float32)
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        n = len(chunk)
        feeds: dict[str, np.ndarray] = {
            "input_ids": chunk[None, :].astype(np.int64),
            "attention_mask": np.ones((1, n), np.int64),
        }
        if "logits_to_keep" in inputs:
            feeds["logits_to_keep"] = np.array(1, np.int64)
        if "query_seqlens" in inputs:
            feeds["query_seqlens"] = np.array([n], np.int32)
        feeds |= {name: np.zeros((1, kv, n, d), np.float32) for name in past}
        for j, cache in enumerate(session.run(presents, feeds)):
            amax = np.abs(cache[0, :, :n, :]).max(axis=1)
            out[j // 2, j % 2] = np.maximum(out[j // 2, j % 2], amax)
    return out


def calibration_ids(config: FuseOptions, hf_dir: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from tokenizers import Tokenizer

    from export.text import first_tokens, read_span

    text, record = read_span(config.calib_text, config.calib_span, "fuse.calib_text")
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = first_tokens(text, lambda t: tok.encode(t, add_special_tokens=False).ids, config.calib_tokens)
    if len(ids) < 2:
        raise ExportError("fuse.calib_text: the calibration span holds fewer than 2 tokens")
    return np.array(ids, np.int64), {**record, "tokens": len(ids), "window": config.calib_window}


# --------------------------------------------------------------------------- as a recipe stage


def build(config: FuseOptions, art: Artifact, out: Path, progress: bool) -> None:
    import onnx

    if art.graph is None or art.layout.get("kv_layout") != "shared":
        raise ExportError("[fuse] options apply to the fused graph (to_onnx.graph 'fused')")
    source = art.graph
    data = source.with_name(source.name + ".data")
    out.mkdir(parents=True, exist_ok=True)
    if data.exists():  # the weights: one file for every variant, linked rather than copied
        link_or_copy(data, out / data.name)
    base = onnx.load(str(source), load_external_data=False)
    record: dict[str, Any] = {"variants": {}}
    kinds = {"fp32": ["fp32"], "int8": ["int8"], "both": ["fp32", "int8"]}[config.kv_cache]
    absmax = None
    if "int8" in kinds:
        ids, record["calibration"] = calibration_ids(config, art.hf_dir)
        absmax = kv_absmax(source, ids, config.calib_window)
    for k, kind in enumerate(kinds):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        if kind == "int8":
            quantize_kv(model, absmax)
        stem = "model" if k == 0 else "model.kv8"  # the first kind is the main graph
        onnx.save(model, str(out / f"{stem}.onnx"))
        if k:
            record["variants"][f"{stem}.onnx"] = {"kv_cache": kind, "query_seqlens": False}
        else:
            record["kv_cache"] = kind
        if config.query_seqlens:
            add_query_seqlens(model)
            onnx.save(model, str(out / f"{stem}.ragged.onnx"))
            record["variants"][f"{stem}.ragged.onnx"] = {"kv_cache": kind, "query_seqlens": True}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def result(config: FuseOptions, art: Artifact, folder: Path) -> Artifact:
    record = json.loads((folder / RECORD).read_text())
    variants = record["variants"]
    return replace(
        art,
        graph=folder / "model.onnx",
        extra_graphs={**art.extra_graphs, **{name: folder / name for name in variants}},
        layout={**art.layout, "kv_cache": record["kv_cache"], "variants": variants},
        facts={"kv_cache": config.kv_cache, "variants": sorted(variants)},
    )


STAGE = Stage("variants", build, result)
