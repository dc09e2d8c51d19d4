"""Stage 5, quantize: an fp32 ONNX decoder in, a quantized one out, with its own error report.

Modes (`QuantizeConfig.mode`):
- "none": copy the fp32 graph.
- "int8": weight-only blockwise INT8 (MatMulNBits, symmetric, `block_size`, `accuracy_level`):
  measured here on SmolLM2 as the best CPU trade (ppl 19.92 vs fp32 19.74, faster decode).
The report gives, per quantized weight, the relative RMS and max-abs error of the dequantized
weight against the original, read back from the written graph (not recomputed from theory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_llm.errors import ExportError

MODES = ("none", "int8")


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["none", "int8"] = "int8"
    block_size: int = 32
    accuracy_level: int = 4  # 4: int8 activations x int8 weights in the kernel (fastest on CPU)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantize.mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError("quantize.block_size must be a power of two in 16..256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("quantize.accuracy_level must be 0..4")


@dataclass(frozen=True)
class QuantizeResult:
    model_path: Path
    method: dict[str, Any]
    errors: dict[str, dict[str, float]]  # weight name -> {rel_rms, max_abs}

    @property
    def worst(self) -> tuple[str, float] | None:
        if not self.errors:
            return None
        name = max(self.errors, key=lambda n: self.errors[n]["rel_rms"])
        return name, self.errors[name]["rel_rms"]


REPORT = "quantize.json"


def run(config: QuantizeConfig, model_path: Path, out_dir: Path) -> QuantizeResult:
    """Quantize `model_path` into `out_dir/model.onnx`; also write `out_dir/quantize.json`."""
    result = _quantize(config, model_path, out_dir)
    report = {"method": result.method, "errors": result.errors}
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return result


def read_report(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / REPORT).read_text())


def _quantize(config: QuantizeConfig, model_path: Path, out_dir: Path) -> QuantizeResult:
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    if config.mode == "none":
        model = onnx.load(str(model_path))
        _save(model, out)
        return QuantizeResult(out, {"method": "none", "dtype": "float32"}, {})
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer logs every node at INFO through its own handler; keep our output readable.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    model = onnx.load(str(model_path))
    originals = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) == 2}
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=8,
        block_size=config.block_size,
        is_symmetric=True,
        accuracy_level=config.accuracy_level,
    )
    quantizer.process()
    qmodel = quantizer.model.model
    errors = weight_errors(qmodel, originals, bits=8)
    if not errors:
        raise ExportError(f"{model_path}: no MatMul weight was quantized")
    _save(qmodel, out)
    method = {
        "method": "matmul_nbits",
        "bits": 8,
        "block_size": config.block_size,
        "accuracy_level": config.accuracy_level,
        "symmetric": True,
    }
    return QuantizeResult(out, method, errors)


def _save(model: Any, out: Path) -> None:
    import onnx

    if out.exists():
        out.unlink()
    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def weight_errors(qmodel: Any, originals: dict[str, np.ndarray], bits: int) -> dict[str, dict[str, float]]:
    """Dequantize every MatMulNBits weight of `qmodel` and compare with the fp32 original."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qmodel.graph.initializer}
    errors: dict[str, dict[str, float]] = {}
    for node in qmodel.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        q = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1, block)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1, 1)
        zero = 1 << (bits - 1)
        if len(node.input) > 3 and node.input[3] in inits:
            zp = numpy_helper.to_array(inits[node.input[3]])
            zero = zp.reshape(n, -1, 1).astype(np.float32) if bits == 8 else zero
        deq = ((q.astype(np.float32) - zero) * scales).reshape(n, -1)[:, :k].T
        name = _original_name(node.input[1], originals)
        if name is None:
            continue
        ref = originals[name].astype(np.float32)
        diff = deq - ref
        errors[name] = {
            "rel_rms": float(np.sqrt((diff**2).mean() / max((ref**2).mean(), 1e-30))),
            "max_abs": float(np.abs(diff).max()),
        }
    return errors


def _original_name(qname: str, originals: dict[str, np.ndarray]) -> str | None:
    for suffix in ("_Q8", "_Q4", ""):
        if qname.endswith(suffix) and qname[: len(qname) - len(suffix)] in originals:
            return qname[: len(qname) - len(suffix)]
    return None
