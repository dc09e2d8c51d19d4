"""Choosing the next token from logits.

In: one row of logits (float32 [V]), the sequence's `SamplingParams`, its RNG and the ids seen
so far. Out: a token id. Greedy when temperature is 0; otherwise temperature, top-k, top-p
(nucleus) and a repetition penalty, all on the smallest array that gives the exact answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_llm.errors import RequestError
from edge_llm.protocol import in_range, range_text

# Nucleus sampling looks at this many best candidates first; a full sort only when their mass
# is short of top_p (rare with a trained model), because argsort over 49k logits per token costs
# more than the whole sampling step otherwise.
_NUCLEUS_WINDOW = 256
# Below this temperature sampling is greedy. Scaling float32 logits by 1/T overflows for tiny T
# (1e-40 is subnormal in float32, 1e-300 rounds to 0): inf - inf then made NaN probabilities.
# It is also exact: any two distinct float32 logits of a model differ by far more than
# 1e-30 * 100, so every token but the best gets probability exp(-1e23) == 0 anyway.
_GREEDY_BELOW = 1e-30


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be ≥ 1"),
            (in_range("temperature", self.temperature), range_text("temperature")),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be ≥ 0"),
            (in_range("top_p", self.top_p), range_text("top_p")),
            (in_range("repetition_penalty", self.repetition_penalty), range_text("repetition_penalty")),
            (
                self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
                "seed must be a non-negative integer",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (
                all(isinstance(i, int) and i >= 0 for i in self.stop_ids),
                "stop_ids must be non-negative integers",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW


def make_rng(params: SamplingParams) -> np.random.Generator:
    return np.random.default_rng(params.seed)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty on every token already in the sequence (prompt included)."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    with np.errstate(all="ignore"):  # a penalty near 0 may overflow (or be 0 in float32): clipped below
        penalised = np.where(picked > 0, picked / penalty, picked * penalty)
    # Keep logits finite: +inf from a tiny penalty would make `inf - inf` NaN when sampling.
    limit = np.finfo(np.float32).max
    logits[seen] = np.clip(penalised, -limit, limit)
    return logits


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> int:
    """Pick the next token id from one row of logits; only among `allowed` (a boolean mask from
    constrained decoding) when given. The mask goes on after the repetition penalty, which
    would otherwise clip the -inf of a banned token back to a finite value."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if allowed is not None:
        logits = np.where(allowed, logits, np.float32(-np.inf))
    if params.greedy:
        return int(np.argmax(logits))
    ids, probs = distribution(logits, params)
    return int(ids[rng.choice(probs.shape[0], p=probs)])


def distribution(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution a sampled (not greedy) request draws from after temperature, top-k and
    top-p: (token ids, their probabilities), only the tokens with probability > 0. Speculative
    decoding's rejection sampling compares a draft with exactly this."""
    logits = logits.astype(np.float32, copy=False)
    # Shift the best logit to 0 before dividing, so scaling only ever pushes the others down
    # (towards -inf, whose exp is 0) and never overflows to +inf.
    with np.errstate(over="ignore"):
        scaled = (logits - logits.max()) / np.float32(params.temperature)
    candidates = _candidates(scaled, params)
    probs = _probs(scaled[candidates], params.top_p)
    return candidates[: probs.shape[0]], probs


def _candidates(scaled: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Ids to sample among, best first: top-k if set, else a window wide enough for top-p."""
    vocab = scaled.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if params.top_p < 1.0 and k > _NUCLEUS_WINDOW:
        window = np.argpartition(-scaled, _NUCLEUS_WINDOW)[:_NUCLEUS_WINDOW]
        window = window[np.argsort(-scaled[window], kind="stable")]
        if _mass(scaled, window) >= params.top_p:
            return window
    if k == vocab:
        return np.argsort(-scaled, kind="stable")
    top = np.argpartition(-scaled, k - 1)[:k]
    return top[np.argsort(-scaled[top], kind="stable")]


def _mass(scaled: np.ndarray, window: np.ndarray) -> float:
    peak = scaled[window[0]]
    total = np.exp(scaled - peak, dtype=np.float64).sum()
    return float(np.exp(scaled[window] - peak, dtype=np.float64).sum() / total)


def _probs(sorted_logits: np.ndarray, top_p: float) -> np.ndarray:
    probs = np.exp(sorted_logits - sorted_logits[0], dtype=np.float64)
    probs /= probs.sum()
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cut = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        probs = probs[:cut] / probs[:cut].sum()
    return probs
