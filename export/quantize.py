"""Stage 5, quantize: an fp32 ONNX decoder in, a quantized one out, with its own error report.

Modes (`QuantizeConfig.mode`), each for a target:
- "none": the fp32 graph, unchanged.
- "int8" (CPU): weight-only blockwise INT8 (MatMulNBits, symmetric, `block_size`,
  `accuracy_level`: 4 = int8 activations inside the kernel, the fast path on x86/ARM CPUs).
- "grid" (CPU): lossless re-encoding of weights that already sit on a GGUF grid (Q4_1 -> 4-bit
  codes + block offsets, Q8_0 -> int8); anything off-grid falls back to "int8". For a GGUF source
  this keeps the source model's exact weights (see `export/nbits.py`).
- "dynamic" (CPU, any ORT build): `onnxruntime.quantization.quantize_dynamic`, MatMul weights
  int8 per output channel, activations quantized at run time (MatMulInteger / DynamicQuantize).
- "qdq" (NPUs, e.g. QNN HTP): `quantize_static` in QDQ format, uint8 activations with ranges
  calibrated (MinMax) on `calib_tokens` tokens of a text span run through the graph as prefill
  (past length 0), int8 symmetric per-channel weights; MatMul only (see `qdq_notes`).
Embeddings (`embeddings`, default "auto": int8 with the int8 / grid modes, else fp32): "fp32"
keeps the token-embedding Gather as is (113 MB in SmolLM2); "int8" replaces it with
GatherBlockQuantized (8-bit, blocks of `block_size` along the hidden dimension). lm_head is a
MatMul and is quantized with the other MatMuls in every mode (for a tied model the graph holds
its own transposed copy).
The report gives, per quantized tensor, bits, relative RMS and max-abs error of the values the
graph computes with against the fp32 originals, plus the worst tensor.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_llm.errors import ExportError
from export import nbits
from export.stage import Artifact, Stage

log = logging.getLogger(__name__)
MODES = ("none", "int8", "grid", "dynamic", "qdq")
REPORT = "quantize.json"
QDQ_NOTES = (
    "QDQ graph with dynamic shapes, calibrated as prefill (past length 0) with MinMax ranges from "
    "calibration text. For NPUs that compile fixed shapes (QNN HTP), a recipe's [static] section "
    "(export/fix_shapes.py) turns it into a decode and a prefill graph over a fixed past."
)


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["none", "int8", "grid", "dynamic", "qdq"] = "int8"
    block_size: int = 64  # SmolLM2: ppl 1.006x fp32 at 72% of block 16's per-token time (configs/recipes)
    # 4: int8 activations x n-bit weights inside the kernel; on x86 CPUs levels 1-3 run a slow
    # dequantize-then-fp32 path (measured ~5x slower per token on SmolLM2).
    accuracy_level: int = 4
    # MatMuls (node-name substrings, e.g. "lm_head", "down_proj") that run with accuracy_level 0
    # (fp32 activations) whatever `accuracy_level` says: int8 activations lost 8 of the teacher's
    # 74 correct QA answers on SmolLM2 (benchmarks/quant_qa.py), and not every MatMul need pay
    # the slow path to win them back.
    exact_activations: tuple[str, ...] = ()
    # "auto": int8 with the CPU weight-only modes (int8, grid), fp32 with the others (none, and
    # the standard-op graphs that ORT's quantizers and NPUs take). SmolLM2, int8 block 64: bundle
    # 249 -> 170 MB, ppl 19.870 -> 19.887 (fp32 19.752), same decode speed and peak RSS (ORT maps
    # the table's pages in as rows are read, so the fp32 table was mostly not resident anyway).
    embeddings: Literal["auto", "fp32", "int8"] = "auto"
    # qdq calibration text (required with mode "qdq"); span kept apart from evaluation's.
    calib_text: Path | None = None
    calib_span: tuple[float, float] = (0.1, 1.0)
    calib_tokens: int = 1024
    calib_seq_len: int = 128
    activation_bits: int = 8  # qdq: 8 (uint8) or 16 (uint16, "A16W8", what QNN HTP runs LLMs with)
    # dynamic, and qdq with 8-bit activations: 7-bit weights. On x86 CPUs without VNNI (AVX2 only)
    # ORT's u8 x s8 kernels add pairs of products in int16, which saturates with full-range
    # weights: a tiny Llama's logits were off by 0.43 on average with 8-bit weights on such a
    # host and within the fp32 tolerance on an AVX-512 VNNI host. false: full 8-bit weights for
    # targets known to have VNNI or an NPU.
    reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantize.mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError("quantize.block_size must be a power of two in 16..256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("quantize.accuracy_level must be 0..4")
        if self.activation_bits not in (8, 16):
            raise ValueError("quantize.activation_bits must be 8 or 16")
        if self.calib_tokens < 2 or self.calib_seq_len < 2:
            raise ValueError("quantize.calib_tokens and calib_seq_len must be >= 2")


def embeddings(config: QuantizeConfig) -> Literal["fp32", "int8"]:
    """The token-embedding format `config` asks for, "auto" resolved by mode."""
    if config.embeddings != "auto":
        return config.embeddings
    return "int8" if config.mode in ("int8", "grid") else "fp32"


@dataclass(frozen=True)
class QuantizeResult:
    model_path: Path
    method: dict[str, Any]
    errors: dict[str, dict[str, float]]  # tensor name -> {bits, rel_rms, max_abs}


def run(
    config: QuantizeConfig, model_path: Path, out_dir: Path, hf_dir: Path | None = None
) -> QuantizeResult:
    """Quantize `model_path` into `out_dir/model.onnx`; also write `out_dir/quantize.json`.

    `hf_dir` (tokenizer) is needed by "qdq" for its calibration text only.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    errors: dict[str, dict[str, float]] = {}
    if config.mode in ("dynamic", "qdq"):
        method = _ort_quantize(config, model_path, out, hf_dir, errors)
        model = onnx.load(str(out))
    else:
        model = onnx.load(str(model_path))
        method = {"method": "none", "dtype": "float32"}
        if config.mode in ("int8", "grid"):
            encode = nbits.encode_int8 if config.mode == "int8" else nbits.encode_auto
            users = _weight_users(model)
            errors = nbits.rewrite_matmuls(
                model, functools.partial(encode, block=config.block_size), _levels(config)
            )
            errors = {users.get(w, w): e for w, e in errors.items()}
            if not errors:
                raise ExportError(f"{model_path}: no MatMul with a constant weight to quantize")
            method = {
                "method": "matmul_nbits",
                "mode": config.mode,
                "bits": sorted({int(e["bits"]) for e in errors.values()}),
                "block_size": config.block_size,
                "accuracy_level": config.accuracy_level,
                **({"exact_activations": list(config.exact_activations)} if config.exact_activations else {}),
            }
    if embeddings(config) == "int8":
        errors |= quantize_embeddings(model, config.block_size)
        method["embeddings"] = {"op": "GatherBlockQuantized", "bits": 8, "block_size": config.block_size}
    if errors:
        method |= summary(errors)
    save(model, out)
    (out_dir / REPORT).write_text(json.dumps({"method": method, "errors": errors}, indent=2) + "\n")
    return QuantizeResult(out, method, errors)


def _levels(config: QuantizeConfig) -> int | Callable[[str], int]:
    """The accuracy level of each MatMulNBits node, by name (see `exact_activations`)."""
    if not config.exact_activations:
        return config.accuracy_level
    return lambda name: 0 if any(p in name for p in config.exact_activations) else config.accuracy_level


def _weight_users(model: Any) -> dict[str, str]:
    """Initializer name -> "node name [initializer]" for MatMul weights (readable report keys)."""
    inits = {i.name for i in model.graph.initializer}
    return {
        n.input[1]: f"{n.name} [{n.input[1]}]"
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and n.name
    }


def quantize_embeddings(model: Any, block: int) -> dict[str, dict[str, float]]:
    """Replace Gathers on 2-D fp32 initializers [V, H] by 8-bit GatherBlockQuantized, in place."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    errors: dict[str, dict[str, float]] = {}
    nodes, dead, extra = [], set(), []
    for node in graph.node:
        init = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if init is None or len(init.dims) != 2 or init.data_type != 1 or axis != 0 or init.dims[1] % block:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(init)
        enc = nbits.encode_int8(w.T, block)  # blocks along the hidden dimension, one row per token
        errors[init.name] = nbits.weight_error(w.T, enc)
        v, h = w.shape
        base = init.name.replace("/", "_")
        data = enc.packed.reshape(v, h)
        scales = enc.scales.reshape(v, h // block)
        zeros = np.full(scales.shape, 128, dtype=np.uint8)
        extra += [
            numpy_helper.from_array(data, base + "_q8"),
            numpy_helper.from_array(scales, base + "_scales"),
            numpy_helper.from_array(zeros, base + "_zp"),
        ]
        nodes.append(
            helper.make_node(
                "GatherBlockQuantized",
                [base + "_q8", node.input[1], base + "_scales", base + "_zp"],
                list(node.output),
                name=(node.name or base) + "_q8",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=block,
                bits=8,
            )
        )
        dead.add(init.name)
    still_used = {i for n in nodes for i in n.input}
    keep = [i for i in graph.initializer if i.name not in dead or i.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + extra)
    nbits._ensure_opset(model, "com.microsoft", 1)
    return errors


def _ort_quantize(
    config: QuantizeConfig, model_path: Path, out: Path, hf_dir: Path | None, errors: dict[str, Any]
) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    data = out.with_name(out.name + ".data")
    for f in (out, data):
        f.unlink(missing_ok=True)
    common = {
        "op_types_to_quantize": ["MatMul"],
        "per_channel": True,
        "use_external_data_format": True,
        "reduce_range": config.reduce_range and (config.mode == "dynamic" or config.activation_bits == 8),
    }
    if config.mode == "dynamic":
        quantize_dynamic(
            str(model_path),
            str(out),
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
            **common,
        )
        method: dict[str, Any] = {
            "method": "ort_dynamic",
            "mode": "dynamic",
            "weights": "int8 per-channel",
            "reduce_range": common["reduce_range"],
        }
    else:
        if hf_dir is None:
            raise ExportError("quantize.mode 'qdq' needs the model's tokenizer for calibration text")
        reader = _calibration_reader(config, model_path, hf_dir)
        graph = onnx.load(str(model_path), load_external_data=False).graph
        consts = {i.name for i in graph.initializer}
        # Activation x activation MatMuls (Q·K^T, P·V) stay fp32: uint8 K/V/probabilities cost
        # far more accuracy than they save; only weight MatMuls get QDQ pairs.
        dynamic_b = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in consts]
        quantize_static(
            str(model_path),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt16 if config.activation_bits == 16 else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 16-bit activations need the com.microsoft Q/DQ ops on opsets before 21.
            extra_options={
                "ActivationSymmetric": False,
                "WeightSymmetric": True,
                "UseQDQContribOps": config.activation_bits == 16,
            },
            nodes_to_exclude=dynamic_b,
            **common,
        )
        method = {
            "method": "ort_qdq",
            "mode": "qdq",
            "weights": "int8 per-channel",
            "reduce_range": common["reduce_range"],
            "activations": f"uint{config.activation_bits} minmax",
            "calibration": {
                "tokens": config.calib_tokens,
                "seq_len": config.calib_seq_len,
                "span": list(config.calib_span),
            },
            "notes": QDQ_NOTES,
        }
    original = onnx.load(str(model_path))
    quant = onnx.load(str(out))
    users = _weight_users(original)
    errors |= {users.get(w, w): e for w, e in _ort_errors(original, quant).items()}
    return method


def _ort_errors(original: Any, quant: Any) -> dict[str, dict[str, float]]:
    """Per-weight error of ORT-quantized weights (dynamic: W_quantized; qdq: DequantizeLinear)."""
    from onnx import numpy_helper

    q = {i.name: i for i in quant.graph.initializer}
    out: dict[str, dict[str, float]] = {}
    for init in original.graph.initializer:
        name = init.name
        cand = [(name + "_quantized", name + "_scale", name + "_zero_point")]
        for qn, sn, zn in cand:
            if qn in q and sn in q:
                w = numpy_helper.to_array(init)
                codes = numpy_helper.to_array(q[qn]).astype(np.float32)
                scale = numpy_helper.to_array(q[sn]).astype(np.float32)
                zero = numpy_helper.to_array(q[zn]).astype(np.float32) if zn in q else 0.0
                deq = (codes - zero) * scale  # per-channel along the last axis (output channels)
                if deq.shape != w.shape:
                    continue
                diff = deq - w
                ref = float((w.astype(np.float64) ** 2).mean())
                out[name] = {
                    "bits": 8,
                    "rel_rms": float(np.sqrt((diff.astype(np.float64) ** 2).mean() / max(ref, 1e-30))),
                    "max_abs": float(np.abs(diff).max()),
                }
    return out


def _calibration_reader(config: QuantizeConfig, model_path: Path, hf_dir: Path) -> Any:
    """Prefill batches (past length 0) of calibration text, as ORT's CalibrationDataReader wants."""
    from onnxruntime.quantization import CalibrationDataReader
    from tokenizers import Tokenizer

    from export.text import read_span
    from export.to_onnx import graph_io

    text, _ = read_span(config.calib_text, config.calib_span, "quantize.calib_text")
    tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
    ids = tok.encode(text[: config.calib_tokens * 12], add_special_tokens=False).ids[: config.calib_tokens]
    hf_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    kv = hf_cfg.get("num_key_value_heads") or hf_cfg["num_attention_heads"]
    d = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
    inputs, _ = graph_io(model_path)
    n = config.calib_seq_len
    feeds = []
    for s in range(0, len(ids) - n + 1, n):
        feed: dict[str, np.ndarray] = {
            "input_ids": np.array([ids[s : s + n]], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
        }
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name in inputs:
            if name.startswith("past_key_values"):
                feed[name] = np.zeros((1, kv, 0, d), dtype=np.float32)
        feeds.append(feed)
    if not feeds:
        raise ExportError("quantize: calibration text shorter than calib_seq_len")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    return Reader()


def read_report(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / REPORT).read_text())


def summary(errors: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean and worst relative RMS error over the quantized weights: the worst weight (by relative
    RMS, as report.md's table ranks them) with its own max-abs error, and separately the largest
    max-abs error of any weight (large-valued tensors such as embeddings have the largest)."""
    if not errors:
        return {}
    worst = max(errors, key=lambda n: errors[n]["rel_rms"])
    largest = max(errors, key=lambda n: errors[n]["max_abs"])
    return {
        "weights": len(errors),
        "mean_rel_rms": sum(e["rel_rms"] for e in errors.values()) / len(errors),
        "worst_weight": worst,
        "worst_rel_rms": errors[worst]["rel_rms"],
        "worst_max_abs": errors[worst]["max_abs"],
        "max_abs_weight": largest,
        "max_abs": errors[largest]["max_abs"],
    }


def save(model: Any, out: Path) -> None:
    """Save with all weights in one external data file beside the graph (`<name>.data`)."""
    import onnx

    data = out.with_name(out.name + ".data")
    for f in (out, data):
        if f.exists():
            f.unlink()
    onnx.save(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


# --------------------------------------------------------------------------- as a recipe stage


def build(config: QuantizeConfig, art: Artifact, out: Path, progress: bool) -> None:
    if art.graph is None:
        raise ExportError("quantize: no graph to quantize (to_onnx must come first)")
    run(config, art.graph, out, hf_dir=art.hf_dir)


def result(config: QuantizeConfig, art: Artifact, folder: Path) -> Artifact:
    rep = read_report(folder)
    # The summary is recomputed from the per-tensor errors, so outputs cached before a change
    # to `summary` report the same figures as new ones.
    method = {**rep["method"], **summary(rep["errors"])}
    return replace(
        art,
        graph=folder / "model.onnx",
        quantization={"method": method, "errors": rep["errors"]},
        facts=summary(rep["errors"]),
    )


STAGE = Stage("quantize", build, result)
