"""The EAGLE-1-style draft (export/draft_eagle.py): its ONNX graph computes what the torch module
trains, drafting as training's unrolled passes assume (real history, then its own guesses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export import draft_eagle
from export.train_draft import DraftConfig

torch = pytest.importorskip("torch")
H, HEADS, VOCAB = 32, 4, 20


def _head() -> object:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB + 1, H)).astype(np.float32)
    head = draft_eagle.make_eagle(table, 24, 1e-6, HEADS, 10000.0, 64)
    torch.manual_seed(0)
    with torch.no_grad():  # every weight random: wo / down start at zero, which hides attention
        for name, p in head.named_parameters():
            if name != "table":
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.startswith("ln") else 0.0))
    return head


def _session(head: object, tmp_path: Path) -> tuple[ort.InferenceSession, np.ndarray]:
    vmap = np.minimum(np.arange(50), VOCAB).astype(np.int64)  # ids >= VOCAB share the last row
    draft_eagle.write_onnx(head, vmap, 1e-6, 10000.0, tmp_path / "draft.onnx")
    return ort.InferenceSession(str(tmp_path / "draft.onnx"), providers=["CPUExecutionProvider"]), vmap


def _run(sess: ort.InferenceSession, hidden: np.ndarray, ids: list[int], key: np.ndarray, value: np.ndarray):
    return sess.run(
        None, {"hidden": hidden, "input_ids": np.asarray(ids, np.int64), "past_key": key, "past_value": value}
    )


def test_graph_matches_the_module_one_pair_at_a_time_and_at_once(tmp_path: Path) -> None:
    head = _head()
    sess, vmap = _session(head, tmp_path)
    rng = np.random.default_rng(1)
    s = 9
    hidden = rng.standard_normal((s, H)).astype(np.float32)
    ids = rng.integers(0, 50, s).tolist()
    with torch.no_grad():
        ((feature, logits),) = head(torch.from_numpy(hidden)[None], torch.from_numpy(vmap[ids])[None], 1)
    empty = np.zeros((0, H), np.float32)
    f_all, l_all, k_all, v_all = _run(sess, hidden, ids, empty, empty)  # all pairs in one forward
    np.testing.assert_allclose(f_all, feature[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(l_all, logits[0].numpy(), rtol=1e-4, atol=1e-3)
    key, value = empty, empty
    for p in range(s):  # one pair at a time over the growing KV cache: the same rows
        f, lg, key, value = _run(sess, hidden[p : p + 1], ids[p : p + 1], key, value)
        np.testing.assert_allclose(f[0], f_all[p], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lg[0], l_all[p], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(key, k_all, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, v_all, rtol=1e-5, atol=1e-5)
    assert key.shape == (s, H)


def test_unrolled_training_passes_are_what_drafting_computes(tmp_path: Path) -> None:
    """Pass j at position p = the j-th draft of the chain from p-j+1: real pairs up to p-j+1 in
    the cache, then the draft's own guessed states (fed the sequence's tokens)."""
    head = _head()
    sess, vmap = _session(head, tmp_path)
    rng = np.random.default_rng(2)
    s, passes = 10, 3
    hidden = rng.standard_normal((s, H)).astype(np.float32)
    ids = rng.integers(0, 50, s).tolist()
    with torch.no_grad():
        outs = head(torch.from_numpy(hidden)[None], torch.from_numpy(vmap[ids])[None], passes)
    empty = np.zeros((0, H), np.float32)
    for origin in range(0, s - passes + 1):
        key, value = empty, empty
        if origin:
            _, _, key, value = _run(sess, hidden[:origin], ids[:origin], empty, empty)
        state, _, key, value = _run(sess, hidden[origin : origin + 1], ids[origin : origin + 1], key, value)
        for j in range(2, passes + 1):
            p = origin + j - 1
            np.testing.assert_allclose(state[0], outs[j - 2][0][0, p - 1].numpy(), rtol=1e-3, atol=1e-3)
            state, logits, key, value = _run(sess, state, ids[p : p + 1], key, value)
            np.testing.assert_allclose(logits[0], outs[j - 1][1][0, p].numpy(), rtol=1e-3, atol=1e-3)


def test_eagle_config_checked() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        DraftConfig(text=Path("x"), kind="eagle3")
    with pytest.raises(ValueError, match="window"):
        DraftConfig(text=Path("x"), kind="eagle1", window=4)
