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

H = 576  # SmolLM2's hidden size
EPS = 1e-5


def _norm_model(opset: int = 21) -> tuple[Any, np.ndarray]:  # (onnx.ModelProto, weight)
    """optimum's RMSNorm: y = w * (x * (1 / Sqrt(ReduceMean(Pow(x, 2)) + eps)))."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).uniform(0.5, 2.0, H).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(EPS, np.float32), "eps"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(w, "w"),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="norm/Pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="norm/ReduceMean", keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"], name="norm/Add"),
        helper.make_node("Sqrt", ["var"], ["rms"], name="norm/Sqrt"),
        helper.make_node("Div", ["one", "rms"], ["inv"], name="norm/Div"),
        helper.make_node("Mul", ["x", "inv"], ["xn"], name="norm/Mul"),
        helper.make_node("Mul", ["w", "xn"], ["y"], name="norm/Mul_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "rmsnorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, H])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), w


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
    """Rows like SmolLM2's residual stream: one massive channel, or moderate, small and zero rows."""
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 1, (5, H))
    rows[0, 7] = 24_926.0  # layer 12's input (x² = 6.2e8 > 65,504)
    rows[1] *= 769.0 / np.abs(rows[1]).max()  # layer 3's
    rows[2] *= 0.01  # small everywhere: the mean of squares must not underflow
    rows[3] = 0.0  # a zero row stays zero (no 0 / 0)
    rows[4, :3] = [300.0, -250.0, 180.0]
    return rows.astype(np.float16).astype(np.float32)  # representable in fp16 (the HTP's input)


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return w * x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + EPS)


def _run_fp16(model: Any, x: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    (y,) = ReferenceEvaluator(_in_fp16(model)).run(None, {"x": x.astype(np.float16)})
    assert y.dtype == np.float16  # really computed in fp16
    return y.astype(np.float64)


def test_rewritten_norm_is_exact_in_fp16_where_the_original_overflows() -> None:
    pytest.importorskip("onnx")
    model, w = _norm_model()
    x = _inputs()
    ref = _reference(x, w)
    before = _run_fp16(model, x)
    # optimum's form: x² = inf on the large rows -> 1/inf = 0 -> the row's output vanishes
    assert np.all(before[0] == 0) and np.all(before[1] == 0)
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
    assert np.all(after[3] == 0)


def test_rewrite_is_exact_in_fp32() -> None:
    ort = pytest.importorskip("onnxruntime")
    model, _ = _norm_model()
    x = _inputs()
    (before,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    fp16_norm.rewrite(model)
    (after,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_opset_before_18_keeps_reduce_axes_as_attribute() -> None:
    """ReduceMax copies ReduceMean's axes in the form the opset uses (an attribute before 18)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    model, _ = _norm_model(opset=17)
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    del mean.input[1]
    mean.attribute.append(helper.make_attribute("axes", [-1]))
    assert fp16_norm.rewrite(model) == 1
    reduce = next(n for n in model.graph.node if n.op_type == "ReduceMax")
    assert len(reduce.input) == 1
    assert [a.name for a in reduce.attribute] == ["keepdims", "axes"]
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture(scope="module")
def static_qdq(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's [static] QDQ bundle: the graphs target qnn-htp compiles."""
    pytest.importorskip("torch")
    from export import recipe as recipe_mod
    from export.fix_shapes import FixShapesConfig
    from export.load import LoadConfig
    from export.quantize import QuantizeConfig
    from tests.conftest import TRAIN_TEXT

    folder = tmp_path_factory.mktemp("fp16norm")
    text = folder / "calib.txt"
    text.write_text("\n".join(TRAIN_TEXT), encoding="utf-8")
    quant = QuantizeConfig(
        mode="qdq", activation_bits=16, calib_tokens=256, calib_seq_len=32, calib_text=text, calib_span=(0, 1)
    )
    recipe = recipe_mod.Recipe(
        name="tiny-static-qdq",
        load=LoadConfig(model=str(tiny_hf)),
        quantize=quant,
        static=FixShapesConfig(past_length=96, prefill_length=16),
    )
    return recipe_mod.run(recipe, folder / "bundle")


def test_static_npu_graphs_have_no_unbounded_square(static_qdq: Path) -> None:
    """The qnn-htp path's graphs ([static] QDQ): every RMSNorm squares x / max|x| only."""
    import onnx

    layers = json.loads((static_qdq / "bundle.json").read_text())["architecture"]["num_layers"]
    for name in ("model.onnx", "prefill.onnx"):
        model = onnx.load(str(static_qdq / name), load_external_data=False)
        squares = [n for n in model.graph.node if n.op_type == "Pow"]
        assert len(squares) == 2 * layers + 1  # two norms per layer and the final one
        assert fp16_norm.unsafe_squares(model) == []
