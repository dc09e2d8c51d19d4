"""The fp16-safe RMSNorm of the NPU graphs (export/fp16_norm.py).

QNN's HTP runs the fp32 ops a QDQ graph leaves in fp16; these tests run the norm the same way on
the CPU (onnx's reference evaluator keeps numpy float16 through every op) and pin that the
rewritten norm gives the exact norm whatever the input's magnitude, while optimum's form
overflows on SmolLM2's residual values (up to 24,926 measured on WikiText-2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import fp16_norm

onnx = pytest.importorskip("onnx")
from benchmarks.qnn_check import NORM_EPS, residual_rows, rms_norm_model  # noqa: E402

FP16_TINY = 2.0**-14  # fp16's smallest normal: the HTP flushes anything smaller to zero


def _in_fp16(model: Any) -> Any:
    """The same graph with every float tensor fp16: how the HTP runs a QDQ graph's fp32 ops."""
    from onnx import TensorProto, numpy_helper

    out = type(model)()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for v in (*out.graph.input, *out.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


def _inputs() -> np.ndarray:
    """SmolLM2-like residual rows (one massive channel, 769, 4,426, small) and a zero row."""
    rows = residual_rows()
    return np.concatenate([rows, np.zeros((1, rows.shape[1]), np.float32)])


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return w * x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + NORM_EPS)


def _run_fp16(model: Any, x: np.ndarray, name: str = "y") -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    (y,) = ReferenceEvaluator(_in_fp16(model)).run([name], {"x": x.astype(np.float16)})
    assert y.dtype == np.float16  # really computed in fp16
    return y.astype(np.float64)


def test_rewritten_norm_is_exact_in_fp16_where_the_original_overflows() -> None:
    model, w = rms_norm_model()
    x = _inputs()
    ref = _reference(x, w)
    before = _run_fp16(model, x)
    # optimum's form: x² = inf on the large rows -> 1/inf = 0 -> the row's output vanishes
    assert np.all(before[0] == 0) and np.all(before[1] == 0) and np.all(before[2] == 0)
    assert fp16_norm.unsafe_squares(model) == ["norm/Pow"]

    assert fp16_norm.rewrite(model) == 1
    assert fp16_norm.unsafe_squares(model) == []
    assert fp16_norm.rewrite(model) == 0  # idempotent: a rewritten norm is not matched again
    after = _run_fp16(model, x)
    assert np.all(np.isfinite(after))
    scale = np.abs(ref).max(-1, keepdims=True)
    scale[scale == 0] = 1.0
    # fp16 rounding (2^-11 relative) over a handful of ops: within 1% of each row's largest output
    assert (np.abs(after - ref) / scale).max() < 1e-2
    assert np.all(after[4] == 0)
    # No value the HTP would flush: the scaled input of every channel of magnitude ≥ 0.25 is a
    # normal fp16 number even next to 24,926 (x / max|x| alone would be 1e-5: flushed to zero).
    scaled = _run_fp16(model, x, "norm/Pow/fp16_s")
    assert np.all(np.abs(scaled[np.abs(x) >= 0.25]) >= FP16_TINY)


def test_rewrite_is_exact_in_fp32() -> None:
    import onnxruntime as ort

    model, _ = rms_norm_model()
    x = _inputs()
    (before,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    fp16_norm.rewrite(model)
    (after,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_opset_before_18_keeps_reduce_axes_as_attribute() -> None:
    """ReduceMax copies ReduceMean's axes in the form the opset uses (an attribute before 18)."""
    from onnx import helper

    model, _ = rms_norm_model()
    model.opset_import[0].version = 17
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    del mean.input[1]
    mean.attribute.append(helper.make_attribute("axes", [-1]))
    assert fp16_norm.rewrite(model) == 1
    reduce = next(n for n in model.graph.node if n.op_type == "ReduceMax")
    assert len(reduce.input) == 1
    assert [a.name for a in reduce.attribute] == ["keepdims", "axes"]
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture(scope="module")
def static_qdq(tiny_hf: Path, tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's [static] QDQ bundle: the graphs target qnn-htp compiles."""
    pytest.importorskip("torch")
    from tests.conftest import static_qdq_bundle

    folder = tmp_path_factory.mktemp("fp16norm")
    return static_qdq_bundle(tiny_hf, tiny_text, folder / "bundle", "tiny-static-qdq")


def test_static_npu_graphs_have_no_unbounded_square(static_qdq: Path) -> None:
    """The qnn-htp path's graphs ([static] QDQ): every RMSNorm squares x / max|x| only."""
    import onnx

    layers = json.loads((static_qdq / "bundle.json").read_text())["architecture"]["num_layers"]
    for name in ("model.onnx", "prefill.onnx"):
        model = onnx.load(str(static_qdq / name), load_external_data=False)
        squares = [n for n in model.graph.node if n.op_type == "Pow"]
        assert len(squares) == 2 * layers + 1  # two norms per layer and the final one
        assert fp16_norm.unsafe_squares(model) == []
