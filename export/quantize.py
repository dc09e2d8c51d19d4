"""Stage 5, quantize: an fp32 ONNX decoder in, a quantized one out, with its own error report.

Modes (`QuantizeConfig.mode`):
- "none": the fp32 graph, unchanged.
- "int8": weight-only blockwise INT8 (MatMulNBits, symmetric, `block_size`, `accuracy_level`).
- "grid": lossless re-encoding of weights that already sit on a GGUF grid (Q4_1 -> 4-bit codes +
  block offsets, Q8_0 -> int8); anything off-grid falls back to "int8". For a GGUF source this
  keeps the source model's exact weights (see `export/nbits.py`).
The report gives, per quantized weight, bits, relative RMS and max-abs error of the weights the
graph computes with against the fp32 originals, plus the worst weight.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_llm.errors import ExportError
from export import nbits

MODES = ("none", "int8", "grid")
REPORT = "quantize.json"


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["none", "int8", "grid"] = "int8"
    block_size: int = 32
    # 4: int8 activations x n-bit weights inside the kernel; on x86 CPUs levels 1-3 run a slow
    # dequantize-then-fp32 path (measured ~5x slower per token on SmolLM2).
    accuracy_level: int = 4

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
    errors: dict[str, dict[str, float]]  # weight name -> {bits, rel_rms, max_abs}


def run(config: QuantizeConfig, model_path: Path, out_dir: Path) -> QuantizeResult:
    """Quantize `model_path` into `out_dir/model.onnx`; also write `out_dir/quantize.json`."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    model = onnx.load(str(model_path))
    if config.mode == "none":
        method: dict[str, Any] = {"method": "none", "dtype": "float32"}
        errors: dict[str, dict[str, float]] = {}
    else:
        encode = nbits.encode_int8 if config.mode == "int8" else nbits.encode_auto
        errors = nbits.rewrite_matmuls(
            model, functools.partial(encode, block=config.block_size), config.accuracy_level
        )
        if not errors:
            raise ExportError(f"{model_path}: no MatMul with a constant weight to quantize")
        bits = sorted({int(e["bits"]) for e in errors.values()})
        method = {
            "method": "matmul_nbits",
            "mode": config.mode,
            "bits": bits,
            "block_size": config.block_size,
            "accuracy_level": config.accuracy_level,
            **summary(errors),
        }
    save(model, out)
    (out_dir / REPORT).write_text(json.dumps({"method": method, "errors": errors}, indent=2) + "\n")
    return QuantizeResult(out, method, errors)


def read_report(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / REPORT).read_text())


def summary(errors: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean and worst relative RMS error over the quantized weights."""
    if not errors:
        return {}
    worst = max(errors, key=lambda n: errors[n]["rel_rms"])
    return {
        "weights": len(errors),
        "mean_rel_rms": sum(e["rel_rms"] for e in errors.values()) / len(errors),
        "worst_weight": worst,
        "worst_rel_rms": errors[worst]["rel_rms"],
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
