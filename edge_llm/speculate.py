"""Speculative decoding with the bundle's trained draft (`bundle.json` graph.draft).

In: a `Generation` whose last forward left the main graph's final hidden state in `q.hidden`
(the position that produced `q.last`). Out: the generation advanced by 1 + accepted tokens, in
one forward of the main graph over [last, d1..dk] with `logits_to_keep = k+1`.

The draft (`export/train_draft.py`), kind "feature-mlp", is stateless: (hidden state, next token)
-> (guessed next hidden state, logits over its reduced vocabulary), so drafting k tokens is k tiny
forwards and nothing needs undoing when a draft is rejected; the main cache is cut back to what
was kept. Kind "eagle1" (`export/draft_eagle.py`) adds one attention layer over the draft's own
history of (state, token) pairs, from the last prompt position on, with its own KV cache
(`DraftKV`, one per generation): each drafting first feeds the real pairs the main graph produced
since the last one (`Generation.trail`: verified and plainly decoded positions alike), then its
guesses; the next drafting reads only the real prefix, so a rejected guess costs nothing to undo.

Greedy requests keep the longest prefix of drafts equal to the main graph's argmax, plus its own
next token: output identical to plain greedy decoding wherever the graph gives the same logits
for a position whether a forward carries 1 token or k+1 (fp32: tested token for token). The int8
MatMulNBits graph does not (up to 0.89 apart on SmolLM2: GroupQueryAttention's 1-token path
differs in the last bit, int8 activations amplify it; benchmarks/README.md), so there a near-tie
can go the other way, unless `[runtime] pad_decode` runs plain steps as 2-token forwards: then
identical bit for bit (tests/edge_llm/test_pad_decode.py). Sampled requests use rejection sampling
(Leviathan et al. 2023, Chen et al. 2023): draft token d ~ q is kept with probability
min(1, p(d)/q(d)), the first rejected one is replaced by a sample of norm(max(0, p - q)), and
after k kept ones the next token is sampled from p — so every token has exactly the
distribution plain sampling gives (p: `sampling.distribution`, temperature/top-k/top-p).
Requests with a repetition penalty or a JSON constraint decode plainly (their p changes with
every kept token).

The trained draft's length is chosen per verify by expected gain: each draft is kept with
probability a (estimated from the request's own verifies: kept / (kept + rejections), prior 1/2),
so k drafts yield (1 - a^(k+1)) / (1 - a) tokens per verify, which costs 1 + (VERIFY_COST +
DRAFT_COST[kind]) k main decode steps; the k with the most tokens per cost wins, and where no k beats
plain decoding (k = 0) speculation pauses for 1, 3, 7, ... plain steps and then probes with one
draft. (Before: +2 after a verify that kept every draft, -1 otherwise, and a pause after every
verify that kept nothing, however often drafts were kept.)

Without a trained draft, `lookup` speculates for greedy requests with prompt lookup: the draft is
the tokens that followed the latest earlier occurrence of the context's last n-gram, verified the
same way (output identical to plain greedy), with the same pause after rejected drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from edge_llm import batching
from edge_llm.bundle import Bundle
from edge_llm.errors import BundleError
from edge_llm.sampling import distribution

if TYPE_CHECKING:
    from edge_llm.board import RunnerOptions
    from edge_llm.engine import Engine, Generation

MAX_BACKOFF = 16
# Verify and draft cost in main decode steps (benchmarks/speculation.py, SmolLM2 int8, 2 threads,
# 2026-12-07 on a loaded 2-core host: a verify of k = 1 / 2 / 3 drafts x1.12 / 1.30 / 1.52 of a
# 1-token step; a draft step 0.015x with a 4k vocabulary). The eagle1 kind's attention layer makes
# its step 0.041x (quiet host, 2026-12-08, benchmarks/README.md), so its cost is its own.
VERIFY_COST = 0.15
DRAFT_COST = {"feature-mlp": 0.015, "eagle1": 0.041}


class Draft:
    """An ONNX Runtime session over the draft graph, and its vocabulary."""

    def __init__(self, bundle: Bundle, options: RunnerOptions) -> None:
        from edge_llm.runner import session_options

        spec = bundle.graph.draft
        if spec is None:
            raise BundleError(f"{bundle.path}: the bundle has no trained draft (export it with [draft])")
        if "hidden_states" not in bundle.graph.outputs:
            raise BundleError(f"{bundle.graph_path}: a draft needs the graph's hidden_states output")
        path = bundle.path / spec.file
        # One thread: a draft step is a few MB of int8 weights, and a second session's own
        # thread pool would spin on the cores the main graph's pool is about to use.
        so = session_options(replace(options, threads=1))
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: onnxruntime cannot load the draft: {exc}") from None
        self.vocab = np.asarray(spec.vocab, np.int64)
        # full id -> draft row (-1: outside the draft vocabulary, probability 0 under the draft)
        self.rows = np.full(bundle.architecture.vocab_size, -1, np.int64)
        self.rows[self.vocab] = np.arange(self.vocab.size)
        if spec.kind not in KINDS:
            known = ", ".join(KINDS)
            raise BundleError(f"{path}: draft kind {spec.kind!r} unknown to this runtime ({known})")
        # eagle1: an attention layer over the draft's own history, with its own KV cache (DraftKV)
        self.stateful = spec.kind == "eagle1"
        self.cost = DRAFT_COST[spec.kind]  # main decode steps per draft step: draft_length weighs it
        inputs = {i.name: i for i in self.session.get_inputs()}
        if self.stateful and not {"past_key", "past_value"} <= set(inputs):
            raise BundleError(f"{path}: an eagle1 draft needs past_key / past_value inputs")
        self.width = int(inputs["past_key"].shape[1]) if self.stateful else 0

    def __call__(self, hidden: np.ndarray, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Stateless kind: (guessed next hidden state [H], logits over the draft vocabulary [Vd])."""
        feature, logits = self.session.run(
            ["feature", "logits"],
            {"hidden": hidden[None].astype(np.float32, copy=False), "input_ids": np.array([token], np.int64)},
        )
        return feature[0], logits[0, : self.vocab.size]

    def step(
        self, kv: DraftKV, hidden: np.ndarray, tokens: Sequence[int], commit: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """eagle1: feed pairs (state [S, H], token [S]) after the cached history; (the last pair's
        feature [H], logits [Vd]). `commit`: the pairs are real (main-graph states) and stay; else
        they are guesses, kept only until the next commit, which reads the real prefix alone."""
        past = slice(0, kv.fed) if commit else slice(0, kv.key.shape[0])
        feature, logits, kv.key, kv.value = self.session.run(
            ["feature", "logits", "present_key", "present_value"],
            {
                "hidden": hidden.astype(np.float32, copy=False),
                "input_ids": np.asarray(tokens, np.int64),
                "past_key": kv.key[past],  # a prefix of rows: a view, no copy
                "past_value": kv.value[past],
            },
        )
        if commit:
            kv.fed += len(tokens)
        return feature[-1], logits[-1, : self.vocab.size]


KINDS = tuple(DRAFT_COST)  # the draft kinds this runtime runs: each has its step cost


class DraftKV:
    """An eagle1 draft's KV cache for one generation: `fed` real pairs (main-graph state, token)
    at its start, then the guesses of the latest drafting. A rejected guess is dropped by reading
    only the first `fed` rows next time (no copy)."""

    def __init__(self, width: int) -> None:
        self.key = np.zeros((0, width), np.float32)
        self.value = np.zeros((0, width), np.float32)
        self.fed = 0


def eligible(engine: Engine, q: Generation, draft: bool) -> bool:
    """Whether `q` may speculate now, with the trained draft (`draft`) or prompt lookup: the one
    gate for both. Not a folded newcomer whose prompt is still going in (`batching.pending`: no
    last token to draft from); a graph that returns every fed position's logits (to verify); no
    JSON constraint or repetition penalty (drafts are verified against the plain distribution,
    and a penalty changes it with every kept token); a token left after the draft. The trained
    draft reads the hidden state of `q.last`; prompt lookup verifies greedy requests only."""
    if batching.pending(q) or not engine.all_logits or q.params.max_tokens - len(q.generated) < 2:
        return False
    if q.constraint is not None or q.params.repetition_penalty != 1.0:
        return False
    return q.hidden is not None if draft else q.params.greedy


def advance(engine: Engine, draft: Draft, q: Generation, max_draft: int) -> bool:
    """Draft, verify and accept for an `eligible` `q`; False (nothing done) when it should decode
    plainly this step."""
    left = q.params.max_tokens - len(q.generated) - 1
    k = draft_length(q.accepted, q.rejected, max_draft, draft.cost)
    if k == 0:  # plain decoding gives more at this acceptance: pause, then probe with one draft
        if q.spec_wait > 0:
            q.spec_wait -= 1
            return False
        k = 1
    room = engine.max_context - len(q.slot.ids) - 1
    k = min(k, left, room)
    if k < 1:
        return False
    greedy = q.params.greedy
    drafts, probs = _draft(draft, q, k, greedy)
    cached = len(q.slot.ids)
    tokens = np.array([[q.last, *drafts]], dtype=np.int64)
    logits = engine._forward_slot(tokens, q.slot, all_logits=True)[0]
    hidden = engine.runner.hidden[0]
    if greedy:
        accepted, nxt = _verify_greedy(logits, drafts)
    else:
        accepted, nxt = _verify_sampled(logits, drafts, probs, draft.rows, q)
    q.rejected += accepted < k
    if _keep(engine, q, tokens, cached, accepted):
        return True
    # The verified positions' real states: the last one is the next draft's input; with a
    # stateful draft each also joins its history (`Generation.trail`), paired with its token.
    for state in hidden[: accepted + 1]:
        q.hidden = state.copy()
    q.accept(nxt)
    return True


def draft_length(
    accepted: int, rejected: int, max_draft: int, draft_cost: float = DRAFT_COST["feature-mlp"]
) -> int:
    """The number of drafts (0..max_draft) with the most expected tokens per unit of cost, after
    `accepted` kept drafts and `rejected` rejections (0: plain decoding gives more); `draft_cost`:
    one draft step in main decode steps."""
    a = (accepted + 1) / (accepted + rejected + 2)

    def rate(k: int) -> float:
        return sum(a**i for i in range(k + 1)) / (1 + (VERIFY_COST + draft_cost) * k)

    return max(range(max_draft + 1), key=rate)


def lookup(engine: Engine, q: Generation, max_draft: int) -> bool:
    """Prompt-lookup speculation for an `eligible` `q` (up to `max_draft` tokens; 0: off); False
    (nothing done) when it should decode plainly this step."""
    k = min(max_draft, q.params.max_tokens - len(q.generated) - 1)
    if k < 1:
        return False
    if q.spec_wait > 0:  # recent drafts were all rejected: plain decoding for a while
        q.spec_wait -= 1
        return False
    drafts = lookup_draft([*q.ids, *q.generated], k, min_ngram=2)
    if not drafts:
        return False
    cached = len(q.slot.ids)
    tokens = np.array([[q.last, *drafts]], dtype=np.int64)
    logits = engine._forward_slot(tokens, q.slot, all_logits=True)[0]
    accepted, _ = _verify_greedy(logits, drafts)
    if _keep(engine, q, tokens, cached, accepted):
        return True
    q.take(logits[accepted])
    return True


def _keep(engine: Engine, q: Generation, tokens: np.ndarray, cached: int, accepted: int) -> bool:
    """After a verify of `tokens` = [[last, *drafts]]: the cache cut back to the kept ones, the
    counts and the pause updated, the kept drafts accepted. True when that finished `q`."""
    drafted = tokens.shape[1] - 1
    engine.runner.truncate(q.slot.cache, cached + 1 + accepted, q.slot.row or 0)
    q.slot.ids.extend(tokens[0, : 1 + accepted].tolist())
    q.drafted += drafted
    q.accepted += accepted
    q.verifies += 1
    # A rejected draft costs a wider forward for nothing: back off exponentially (novel text
    # has few repeats), and speculate every step again as soon as drafts are being accepted.
    q.spec_backoff = 0 if accepted else min(2 * q.spec_backoff + 1, MAX_BACKOFF)
    q.spec_wait = q.spec_backoff
    for d in tokens[0, 1 : 1 + accepted]:
        q.accept(int(d))
        if q.finished:
            return True
    return False


def _draft(draft: Draft, q: Generation, k: int, greedy: bool) -> tuple[list[int], list[np.ndarray]]:
    """k draft tokens (argmax, or sampled from the draft at the request's temperature) and, when
    sampled, the draft distribution each was drawn from (over the draft vocabulary)."""
    assert q.hidden is not None
    state, token = q.hidden, q.last
    drafts: list[int] = []
    probs: list[np.ndarray] = []
    kv = None
    if draft.stateful:  # the real pairs since the last drafting go in first (q.trail ends with
        # the current one: (q.hidden, q.last)), then each guess after them
        assert q.trail is not None
        if q.draft_kv is None:
            q.draft_kv = DraftKV(draft.width)
        kv = q.draft_kv
        tokens = q.generated[kv.fed :]
        if len(tokens) != len(q.trail) or tokens[-1] != q.last:
            raise RuntimeError("draft history out of step with the generation")  # a bug, not input
        state, logits = draft.step(kv, np.stack(q.trail), tokens, commit=True)
        q.trail.clear()
    for i in range(k):
        if kv is None:
            state, logits = draft(state, token)
        elif i:
            state, logits = draft.step(kv, state[None], [token], commit=False)
        if greedy:
            row = int(np.argmax(logits))
        else:
            z = (logits - logits.max()) / max(q.params.temperature, 1e-6)
            p = np.exp(z.astype(np.float64))
            p /= p.sum()
            row = int(q.rng.choice(p.shape[0], p=p))
            probs.append(p)
        token = int(draft.vocab[row])
        drafts.append(token)
    return drafts, probs


def _verify_greedy(logits: np.ndarray, drafts: list[int]) -> tuple[int, int]:
    choice = logits.argmax(axis=-1)
    accepted = 0
    while accepted < len(drafts) and choice[accepted] == drafts[accepted]:
        accepted += 1
    return accepted, int(choice[accepted])


def _verify_sampled(
    logits: np.ndarray, drafts: list[int], probs: list[np.ndarray], rows: np.ndarray, q: Generation
) -> tuple[int, int]:
    """Rejection sampling: (drafts kept, the token after them), each distributed as plain
    sampling from the main graph would be."""
    for i, d in enumerate(drafts):
        ids, p = distribution(logits[i], q.params)
        target = p[ids == d]
        p_d = float(target[0]) if target.size else 0.0
        q_d = float(probs[i][rows[d]])
        if q.rng.random() * q_d < p_d:  # accept with probability min(1, p/q)
            continue
        q_at = np.where(rows[ids] >= 0, probs[i][np.maximum(rows[ids], 0)], 0.0)
        residual = np.maximum(p - q_at, 0.0)
        total = residual.sum()
        # total == 0 only when p <= q everywhere, i.e. p == q: then d was accepted surely above.
        residual = residual / total if total > 0 else p
        return i, int(ids[q.rng.choice(ids.shape[0], p=residual)])
    ids, p = distribution(logits[len(drafts)], q.params)
    return len(drafts), int(ids[q.rng.choice(ids.shape[0], p=p)])


def lookup_draft(
    context: Sequence[int], k: int, max_ngram: int = 3, window: int = 1024, min_ngram: int = 1
) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the context's last
    n-gram (longest n first, within the last `window` tokens): prompt-lookup's draft."""
    arr = np.asarray(context[-window:], dtype=np.int64)
    for n in range(min(max_ngram, arr.size - 1), min_ngram - 1, -1):
        starts = arr.size - n  # candidate occurrences begin at 0 .. starts-1 (not the tail itself)
        match = np.ones(starts, dtype=bool)
        for j in range(n):
            match &= arr[j : starts + j] == arr[starts + j]
        hits = np.flatnonzero(match)
        if hits.size:
            return arr[hits[-1] + n : hits[-1] + n + k].tolist()
    return []
