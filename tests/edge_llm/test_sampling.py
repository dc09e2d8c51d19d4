from __future__ import annotations

import numpy as np
import pytest

from edge_llm.errors import RequestError
from edge_llm.sampling import SamplingParams, apply_repetition_penalty, make_rng, sample


def logits(n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32) * 3


def test_greedy_is_argmax() -> None:
    x = logits()
    assert sample(x, SamplingParams(), make_rng(SamplingParams())) == int(x.argmax())


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    x = logits()
    for p in (
        SamplingParams(temperature=1.0, top_k=1, seed=0),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=0),
    ):
        assert sample(x, p, make_rng(p)) == int(x.argmax())


def test_top_k_restricts_support() -> None:
    x = logits()
    p = SamplingParams(temperature=2.0, top_k=5, seed=3)
    rng = make_rng(p)
    allowed = set(np.argsort(-x)[:5].tolist())
    assert {sample(x, p, rng) for _ in range(300)} <= allowed


def test_top_p_restricts_to_nucleus_including_full_sort_path() -> None:
    x = np.zeros(1000, dtype=np.float32)  # flat: the 256-wide window never reaches top_p
    x[:3] = [5.0, 4.0, 3.0]
    for top_p in (0.5, 0.999):
        p = SamplingParams(temperature=1.0, top_p=top_p, seed=1)
        rng = make_rng(p)
        probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        order = np.argsort(-probs, kind="stable")
        cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
        picks = {sample(x, p, rng) for _ in range(300)}
        assert picks <= set(order[:cut].tolist())


def test_sampling_follows_distribution() -> None:
    x = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    p = SamplingParams(temperature=1.0, seed=0)
    rng = make_rng(p)
    counts = np.bincount([sample(x, p, rng) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_repetition_penalty() -> None:
    x = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    y = apply_repetition_penalty(x, np.array([0, 1]), 2.0)
    np.testing.assert_allclose(y, [1.0, -4.0, 1.0])
    assert x[0] == 2.0  # input untouched


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"seed": -3},
        {"stop": ("",)},
        {"repetition_penalty": 0.0},
    ],
)
def test_invalid_params_rejected(kwargs: dict) -> None:
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)
