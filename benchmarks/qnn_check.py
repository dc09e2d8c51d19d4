"""Prove the QNN HTP path on x86: a small fixed-shape QDQ graph on the HTP simulator vs the CPU EP.

Needs a venv with onnxruntime-qnn (a plugin EP for onnxruntime >= 1.24.2; its x86_64 wheel ships
libQnnHtp.so, the HTP backend running as a simulator) and onnx:

    python -m venv /work/venvs/qnn && /work/venvs/qnn/bin/pip install onnxruntime-qnn onnx numpy
    /work/venvs/qnn/bin/python benchmarks/qnn_check.py [--out DIR]
    PYTHONPATH=. /work/venvs/qnn/bin/python benchmarks/qnn_check.py --norm

`--norm`: one RMSNorm (optimum's form, SmolLM2's width) as a float graph, which the HTP runs in
fp16, before and after export/fp16_norm.py's rewrite, on rows like SmolLM2's residual stream
(one channel at 24,926; a row scaled to 769; the final norm's 4,426; a small row): per row, the
median relative error of the ordinary channels against the exact norm, as JSON.

Steps: build a QDQ MatMul chain with static shapes (what `[static]` + qdq exports are made of);
register the plugin library, pick the QNN device with `add_provider_for_devices`
(backend_path = the wheel's libQnnHtp.so) and disable CPU fallback, so a pass means the HTP ran
every node; compile it to an EPContext model (the context binary a board loads without
recompiling); run it and the plain model on the CPU EP and print the differences as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def qdq_model(path: Path, dim: int = 64, layers: int = 2, seed: int = 0) -> None:
    """x [1, dim] -> (Q/DQ -> MatMul(DQ(w_i)) -> Relu) x layers, uint8 activations and weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w = rng.normal(0, 0.2, (dim, dim)).astype(np.float32)
        w_scale = np.float32(np.abs(w).max() / 127)
        wq = (np.clip(np.rint(w / w_scale), -127, 127) + 128).astype(np.uint8)
        inits += [
            numpy_helper.from_array(wq, f"w{i}_q"),
            numpy_helper.from_array(np.array(w_scale, np.float32), f"w{i}_s"),
            numpy_helper.from_array(np.array(128, np.uint8), f"w{i}_z"),
            numpy_helper.from_array(np.array(0.05, np.float32), f"a{i}_s"),
            numpy_helper.from_array(np.array(128, np.uint8), f"a{i}_z"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [x, f"a{i}_s", f"a{i}_z"], [f"xq{i}"]),
            helper.make_node("DequantizeLinear", [f"xq{i}", f"a{i}_s", f"a{i}_z"], [f"xd{i}"]),
            helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s", f"w{i}_z"], [f"wd{i}"]),
            helper.make_node("MatMul", [f"xd{i}", f"wd{i}"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    inits += [
        numpy_helper.from_array(np.array(0.05, np.float32), "o_s"),
        numpy_helper.from_array(np.array(0, np.uint8), "o_z"),
    ]
    nodes += [
        helper.make_node("QuantizeLinear", [x, "o_s", "o_z"], ["oq"]),
        helper.make_node("DequantizeLinear", ["oq", "o_s", "o_z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))


def qnn_options(context_path: Path | None = None, soc_model: int = 57) -> ort.SessionOptions:
    """Session options for the HTP (simulator); `soc_model` 57 (SM8650) as export/compile_qnn.py's
    DEFAULT_SOC: the simulator's default SoC cannot finalize some graphs (a lone RMSNorm)."""
    import onnxruntime_qnn

    devices = [d for d in ort.get_ep_devices() if d.ep_name == onnxruntime_qnn.EP_NAME]
    if not devices:
        raise RuntimeError("no QNN device after registering the plugin library")
    so = ort.SessionOptions()
    options = {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": str(soc_model)}
    so.add_provider_for_devices(devices, options)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_path is not None:  # compile: write the EPContext model (embedded context binary)
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_path))
        so.add_session_config_entry("ep.context_embed_mode", "1")
    return so


NORM_EPS = 1e-5


def rms_norm_model(
    hidden: int = 576, rows: int | None = None, seed: int = 0
) -> tuple[onnx.ModelProto, np.ndarray]:
    """optimum's RMSNorm, y = w * (x * (1 / Sqrt(ReduceMean(Pow(x, 2)) + eps))), and its weight w."""
    w = np.random.default_rng(seed).uniform(0.5, 2.0, hidden).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(NORM_EPS, np.float32), "eps"),
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
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w


def residual_rows(hidden: int = 576) -> np.ndarray:
    """Rows like SmolLM2's residual stream on WikiText-2 (measured maxima; fp16-representable)."""
    x = np.random.default_rng(1).normal(0, 1, (4, hidden))
    x[0, 7] = 24_926.0  # layer 12's input: one massive channel (x² = 6.2e8 > 65,504)
    x[1] *= 769.0 / np.abs(x[1]).max()  # layer 3's input
    x[2, 7] = 4_426.0  # the final norm's input
    x[3] *= 0.05  # small everywhere
    return x.astype(np.float16).astype(np.float32)


def norm_check(out: Path) -> dict[str, object]:
    """The RMSNorm before and after export/fp16_norm.py on the HTP: errors of ordinary channels."""
    from export import fp16_norm

    x = residual_rows()
    result: dict[str, object] = {}
    for name in ("original", "fp16_norm"):
        model, w = rms_norm_model(rows=x.shape[0])
        if name == "fp16_norm":
            fp16_norm.rewrite(model)
        path = out / f"norm_{name}.onnx"
        onnx.save(model, str(path))
        sess = ort.InferenceSession(str(path), sess_options=qnn_options())
        y = sess.run(None, {"x": x})[0].astype(np.float64)
        x64 = x.astype(np.float64)
        ref = w * x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + NORM_EPS)
        ordinary = np.abs(x64) < 1000  # all but the massive channels
        rel = np.abs(y - ref) / np.maximum(np.abs(ref), 1e-12)
        result[name] = {
            "provider": sess.get_providers()[0],
            "median_rel_err_per_row": [float(np.median(rel[r][ordinary[r]])) for r in range(len(x))],
            "max_abs_err": float(np.abs(y - ref).max()),
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="qnn-check-")))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--norm", action="store_true", help="check the RMSNorm rewrite instead (needs the repo)")
    args = ap.parse_args()
    import onnxruntime_qnn

    args.out.mkdir(parents=True, exist_ok=True)
    ort.register_execution_provider_library(onnxruntime_qnn.EP_NAME, onnxruntime_qnn.get_library_path())
    if args.norm:
        print(json.dumps(norm_check(args.out), indent=2))
        return
    model, ctx = args.out / "qdq.onnx", args.out / "qdq_ctx.onnx"
    qdq_model(model, args.dim)
    x = np.random.default_rng(1).normal(0, 1, (1, args.dim)).astype(np.float32)
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    t0 = time.perf_counter()
    ort.InferenceSession(str(model), sess_options=qnn_options(ctx))  # compiles, writes ctx
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(ctx), sess_options=qnn_options())
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    htp = sess.run(None, {"x": x})[0]
    run_s = time.perf_counter() - t0
    ctx_ops = sorted({n.op_type for n in onnx.load(str(ctx)).graph.node})
    print(
        json.dumps(
            {
                "onnxruntime": ort.__version__,
                "onnxruntime_qnn": onnxruntime_qnn.__version__,
                "providers": sess.get_providers(),
                "context_model_ops": ctx_ops,
                "context_model_bytes": ctx.stat().st_size,
                "compile_s": round(compile_s, 3),
                "load_context_s": round(load_s, 3),
                "run_s": round(run_s, 4),
                "max_abs_diff_vs_cpu": float(np.abs(htp - cpu).max()),
                "output_scale": 0.05,
                "argmax_equal": bool(htp.argmax() == cpu.argmax()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
