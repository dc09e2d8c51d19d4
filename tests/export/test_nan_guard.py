"""The openvino target's graph without torch's NaN guard after the softmax (export/nan_guard.py).

OpenVINO has no IsNaN, so each guard ran on the CPU EP (30 nodes for SmolLM2). Dropping it must
not change any real position's output: here a left-padded batch (whose padding queries mask every
key: the rows the guard was for) and a decode step over that padded past, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from export import nan_guard, targets
from export.recipe import Recipe
from export.targets import TargetConfig
from export.to_onnx import STAGE_VERSION, ToOnnxConfig, key


def _feed(layers: int, kv: int, d: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    ids = np.random.default_rng(0).integers(3, 380, size=(2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :5] = 0  # row 1 left-padded by 5: those queries see no unmasked key
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(layers):
        for k in ("key", "value"):
            feed[f"past_key_values.{i}.{k}"] = np.zeros((2, kv, 0, d), np.float32)
    return feed, mask.astype(bool)


def test_dropping_the_guard_changes_no_real_position(tiny_bundle: Path) -> None:
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    guarded = onnx.load(str(tiny_bundle / "model.onnx"))
    layers = sum(n.op_type == "Softmax" for n in guarded.graph.node)
    model = onnx.ModelProto()
    model.CopyFrom(guarded)
    assert nan_guard.drop(model) == layers == 2
    assert sum(n.op_type == "IsNaN" for n in model.graph.node) == 0
    assert nan_guard.drop(model) == 0
    a_s = ort.InferenceSession(guarded.SerializeToString(), providers=["CPUExecutionProvider"])
    b_s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    past = next(i for i in a_s.get_inputs() if i.name == "past_key_values.0.key").shape
    feed, real = _feed(layers, past[1], past[3])
    names = [o.name for o in a_s.get_outputs()]
    a = dict(zip(names, a_s.run(None, feed), strict=True))
    b = dict(zip(names, b_s.run(None, feed), strict=True))
    assert np.array_equal(a["logits"][real], b["logits"][real])
    assert all(np.isfinite(v).all() for v in b.values())  # padding rows: finite, not NaN
    step = {"input_ids": feed["input_ids"][:, :1], "position_ids": feed["position_ids"][:, -1:] + 1}
    step["attention_mask"] = np.concatenate([feed["attention_mask"], np.ones((2, 1), np.int64)], 1)
    outs = []
    for sess, presents in ((a_s, a), (b_s, b)):
        past_feed = {n.replace("present", "past_key_values"): v for n, v in presents.items() if n != "logits"}
        outs.append(sess.run(["logits"], {**step, **past_feed})[0])
    assert np.array_equal(outs[0], outs[1])  # the padded past is masked with weight exactly 0


def test_openvino_target_drops_the_guard_and_other_targets_keep_it() -> None:
    assert targets.adapt(Recipe(target=TargetConfig("openvino"))).to_onnx.nan_guard is False
    assert Recipe().to_onnx.nan_guard is True


def test_the_default_config_keeps_its_cache_key() -> None:
    """Keys of graphs that keep the guard are those from before the option existed (measured with
    the previous to_onnx.py), so cached exports stay valid; dropping it is another graph."""
    art = SimpleNamespace(key_parts=("a",))
    assert STAGE_VERSION == 3
    assert key(ToOnnxConfig(), art) == "d5b431bfbe824602"
    assert key(ToOnnxConfig(graph="optimum"), art) == "ab98ad2084a2157b"
    assert key(ToOnnxConfig(graph="optimum", nan_guard=False), art) != "ab98ad2084a2157b"
