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
- `pad_query_row = true`: every GroupQueryAttention node gets one dummy query row after each row's
  last new token (`pad_query_row`) where the graph input `query_pad` is 1, so a 1-token decode
  runs the attention kernel's multi-row path, as a k-token speculative verify does. The runtime
  feeds 1 to forwards of one row (where speculation runs) and 0 to batched ones, which then run
  as the unpadded graph (no dummy rows: ~9% of 8-stream throughput, and the portable graph can
  batch again: its GQA refuses 2 query rows over a past for more than one row). On an int8
  graph (MatMulNBits accuracy_level 4) the 1-row path's last-bit difference became logit gaps up
  to 1.78 on SmolLM2 (benchmarks/results/exact_decode.json) and greedy speculation parted from
  plain decoding; padded, plain decode gives the verify's logits bit for bit (benchmarks/README.md,
  issue 17).
  The dummy's KV lands one past the row's length: the bundle records `graph.kv_spare = 1` and
  the runtime's KV buffers hold one spare position.

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

from edge_llm.bundle import PAD_INPUT
from edge_llm.errors import ExportError
from export.cache import stable_key
from export.onnx_graph import link_or_copy
from export.stage import Artifact, Stage, chain_key
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
    # A dummy query row in every GQA node of every graph, behind the graph input `query_pad`: the
    # runtime pads forwards of one row, so plain decoding equals verify forwards bit for bit
    # (greedy speculation, which runs on lone rows, gives plain decoding's tokens), and not
    # batched steps (always padded, 8-stream throughput was ~9% lower; README).
    pad_query_row: bool = False

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


PAD = "pad_query_row"  # prefix of the names pad_query_row adds
# The padded graph's switch is PAD_INPUT, an int32 scalar input: 1 = the dummy row, 0 = none. A
# required input, not an overridable initializer (a default of 1 would let older runtimes run the
# graph as before, but onnxruntime warns at every session start that such an initializer is not
# constant), so a bundle with it requires the runtime that feeds it (`requirements.edge_llm`).
# Part of the variants stage's cache key when padding: 2 = the dummy behind PAD_INPUT (1: always).
PAD_VERSION = 2


def pad_query_row(model: Any) -> None:
    """Give every GroupQueryAttention node of `model` (a graph written by export/fuse.py, any
    variant) one dummy query row where the int32 scalar input `query_pad` (PAD_INPUT) is fed 1:
    a copy of each row's last new token, fed right after it, with GQA's lengths one longer; the
    dummy's output row is dropped again. Fed 0, the graph is the unpadded one (the same GQA inputs
    bit for bit; the index below is then the identity on every real token).

    Why: GQA's CPU kernel computes a lone query row (S = 1) on another path than several rows, a
    last-bit difference that int8 activations amplify; with the dummy a decode step has S = 2,
    the path verify forwards take, and every other op of the graph is row-independent. Row b's
    dummy sits at index qlens_b, right after its own last real token (a ragged row of the
    query_seqlens graph: inside its padding, which it ignores; a full row: at index S, the extra
    position). GQA writes the dummy's KV at position length + new tokens, one past the row, where
    the next forward overwrites it: the KV buffer needs one spare position (bundle.json
    `graph.kv_spare`). The rotary tables get one more row, a copy of the last: only a dummy, whose
    KV is never read, can sit at position max_context, and a sequence may still fill it.

    Why a switch rather than always: the dummy doubles GQA's query rows, which at batch 8 cost
    ~9% of throughput (README), while speculation, the only thing that needs the verify's path,
    runs on lone rows; and the portable GQA (no query_seqlens) refuses S > 1 over a past for more
    than one row, so an always-padded portable graph could not batch at all."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    nodes = list(g.node)
    by_name = {n.name: n for n in nodes}
    gqa = [i for i, n in enumerate(nodes) if n.op_type == GQA]
    if "qlens_i64" not in by_name or "seq_len" not in by_name or not gqa:
        raise ExportError(f"{PAD}: not a fused graph written by export/fuse.py (no qlens_i64 / seq_len)")
    if any(n.name.startswith(PAD) for n in nodes):
        return  # padded already
    added: list[Any] = []

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), f"{PAD}/{name}"))
        return f"{PAD}/{name}"

    def op(op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        added.append(helper.make_node(op_type, inputs, [f"{PAD}/{name}"], name=f"{PAD}/{name}", **attrs))
        return f"{PAD}/{name}"

    g.input.append(helper.make_tensor_value_info(PAD_INPUT, TensorProto.INT32, []))
    pad32 = PAD_INPUT
    pad = op("Cast", [pad32], "pad_i64", to=TensorProto.INT64)
    one, zero = const("one", 1), const("zero", 0)
    axes = [const(f"axes_{i}", [i]) for i in range(3)]
    # The fuse stage's seq_len is a [1] tensor (its index constant is [1]); Range wants scalars.
    seq = op("Reshape", [by_name["seq_len"].output[0], const("shape_scalar", np.zeros(0))], "seq")
    rows = op("Reshape", [seq, const("shape_1", [1])], "rows")
    # Fed position s of row b copies position min(s, qlens_b - 1): [B, S + pad, 1] for GatherND.
    span = op(
        "Unsqueeze",
        [op("Range", [zero, op("Add", [seq, pad], "seq_plus_pad"), one], "span"), axes[0]],
        "span_1s",
    )
    last = op("Unsqueeze", [op("Sub", [by_name["qlens_i64"].output[0], one], "last"), axes[1]], "last_b1")
    index = op("Unsqueeze", [op("Min", [span, last], "index_bs"), axes[2]], "index")
    first = nodes[gqa[0]]
    swap = {
        name: op("Add", [name, pad32], f"{role}_plus_pad")
        for role, name in (("seqlens_k", first.input[5]), ("total", first.input[6]))
    }
    if len(first.input) > QUERY_SEQLENS and first.input[QUERY_SEQLENS]:
        swap[first.input[QUERY_SEQLENS]] = op(
            "Add", [first.input[QUERY_SEQLENS], pad32], "query_seqlens_plus_pad"
        )
    minus_1, end = const("minus_1", [-1]), const("end", [np.iinfo(np.int64).max])
    for kind, table in (("cos", first.input[7]), ("sin", first.input[8])):
        last_row = op("Slice", [table, minus_1, end, axes[0]], f"{kind}_last_row")
        swap[table] = op("Concat", [table, last_row], f"rope_{kind}", axis=0)
    start = const("start", [0])
    out = nodes[: gqa[0]] + added
    for node in nodes[gqa[0] :]:
        if node.op_type != GQA:
            out.append(node)
            continue
        for j in (0, 1, 2):  # packed qkv, or separate q, k, v
            if node.input[j]:
                fed = f"{node.name}/{PAD}/input{j}"
                out.append(
                    helper.make_node("GatherND", [node.input[j], index], [fed], name=fed, batch_dims=1)
                )
                node.input[j] = fed
        for j, name in enumerate(node.input):
            if j >= 5 and name in swap:
                node.input[j] = swap[name]
        result = node.output[0]
        node.output[0] = f"{result}/{PAD}"
        out.append(node)
        drop = f"{node.name}/{PAD}/drop_row"
        out.append(helper.make_node("Slice", [node.output[0], start, rows, axes[1]], [result], name=drop))
    del g.node[:]
    g.node.extend(out)


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
        absmax = kv_absmax(source, ids, config.calib_window)  # the unpadded graph: same KV

    def save(model: Any, name: str) -> None:
        if config.pad_query_row:  # last: the dummy follows whatever lengths the graph feeds GQA
            padded = onnx.ModelProto()
            padded.CopyFrom(model)
            pad_query_row(padded)
            model = padded
        onnx.save(model, str(out / name))

    record["kv_spare"] = int(config.pad_query_row)  # KV positions a forward writes past its tokens
    for k, kind in enumerate(kinds):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        if kind == "int8":
            quantize_kv(model, absmax)
        stem = "model" if k == 0 else "model.kv8"  # the first kind is the main graph
        save(model, f"{stem}.onnx")
        if k:
            record["variants"][f"{stem}.onnx"] = {"kv_cache": kind, "query_seqlens": False}
        else:
            record["kv_cache"] = kind
        if config.query_seqlens:
            add_query_seqlens(model)
            save(model, f"{stem}.ragged.onnx")
            record["variants"][f"{stem}.ragged.onnx"] = {"kv_cache": kind, "query_seqlens": True}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def result(config: FuseOptions, art: Artifact, folder: Path) -> Artifact:
    record = json.loads((folder / RECORD).read_text())
    variants = record["variants"]
    return replace(
        art,
        graph=folder / "model.onnx",
        extra_graphs={**art.extra_graphs, **{name: folder / name for name in variants}},
        layout={
            **art.layout,
            "kv_cache": record["kv_cache"],
            "variants": variants,
            **({"kv_spare": record["kv_spare"]} if record.get("kv_spare") else {}),
        },
        facts={"kv_cache": config.kv_cache, "variants": sorted(variants), PAD: config.pad_query_row},
    )


def key(config: FuseOptions, art: Artifact) -> str:
    """The stage's cache key: padded graphs also key on PAD_VERSION (a cached output of an older
    padding must not be reused); unpadded ones keep the plain key (their graphs are unchanged)."""
    return stable_key(art.key, config, PAD_VERSION) if config.pad_query_row else chain_key(config, art)


STAGE = Stage("variants", build, result, key=key)
