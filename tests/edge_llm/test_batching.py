"""The fused (shared-KV) graph: same tokens as transformers, and continuous batching changes
nothing about any sequence's output — only how many forwards it takes."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from edge_llm.engine import Engine, Generation, Slot
from edge_llm.runner import lazy_zeros
from edge_llm.sampling import SamplingParams

PROMPTS = ["The capital of France", "Small language models run", "def add(a, b):", "Grüße aus"]


@pytest.fixture(scope="module")
def fused(tiny_fused: Path) -> Engine:
    return Engine.load(tiny_fused)


def test_fused_bundle_manifest(fused: Engine) -> None:
    g = fused.bundle.graph
    assert g.kv_layout == "shared" and g.logits == "tail"
    assert "logits_to_keep" in g.inputs
    assert fused.max_context == 256


def test_fused_greedy_matches_optimum_graph(fused: Engine, tiny_bundle: Path) -> None:
    plain = Engine.load(tiny_bundle)
    for prompt in PROMPTS:
        ids = plain.encode_request(prompt=prompt)
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        assert fused.complete(ids, params).token_ids == plain.complete(ids, params).token_ids


def test_fused_int8_close_to_fp32(fused: Engine, tiny_fused_int8: Path) -> None:
    int8 = Engine.load(tiny_fused_int8)
    ids = fused.encode_request(prompt=PROMPTS[0])
    a = fused.runner.forward(np.array([ids]), fused.runner.empty())
    b = int8.runner.forward(np.array([ids]), int8.runner.empty())
    assert np.abs(a - b).max() < 0.05 * (a.max() - a.min())


def _batched(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], join_late: int) -> list:
    """Run prompts through one batch cache; the last `join_late` join after 5 decode steps."""
    cache = engine.runner.empty(len(prompts))
    seqs = []
    for row, (ids, p) in enumerate(zip(prompts[: len(prompts) - join_late], params, strict=False)):
        seqs.append(engine.start(ids, p, Slot(cache=cache, row=row)))
    for _ in range(5):
        engine.step(seqs)
    for row in range(len(prompts) - join_late, len(prompts)):
        seqs.append(engine.start(prompts[row], params[row], Slot(cache=cache, row=row)))
    while not all(q.finished for q in seqs):
        engine.step(seqs)
    return [q.final() for q in seqs]


def test_continuous_batching_equals_solo_runs(fused: Engine) -> None:
    prompts = [fused.encode_request(prompt=p) for p in PROMPTS]
    params = [
        SamplingParams(max_tokens=12, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=7, ignore_eos=True),  # finishes first: its row goes idle
        SamplingParams(max_tokens=16, temperature=1.2, top_k=20, seed=9, ignore_eos=True),
    ]
    solo = [fused.complete(ids, p) for ids, p in zip(prompts, params, strict=True)]
    batched = _batched(fused, prompts, params, join_late=2)
    for s, b in zip(solo, batched, strict=True):
        assert b.token_ids == s.token_ids
        assert b.text == s.text and b.finish_reason == s.finish_reason


def test_shared_slot_reuse_skips_prefill(fused: Engine) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    slot = Slot()
    ids = fused.encode_request(messages=[{"role": "user", "content": "hi"}])
    first = fused.complete(ids, params, slot)
    ids2 = ids + list(first.token_ids) + fused.encode_request(prompt=" more")
    again = fused.complete(ids2, params, slot)
    fresh = fused.complete(ids2, params, Slot())
    assert again.usage.cached_tokens >= len(ids) and again.token_ids == fresh.token_ids


@pytest.mark.parametrize("kind", ["tiny_fused", "tiny_fused_last", "tiny_fused_all"])
def test_score_matches_optimum_graph(kind: str, request: pytest.FixtureRequest, tiny_bundle: Path) -> None:
    """Every logits kind scores a text like the optimum graph ("last" steps token by token)."""
    plain = Engine.load(tiny_bundle)
    fused = Engine.load(request.getfixturevalue(kind))
    ids = plain.encode_request(prompt="Small language models run on embedded boards")
    np.testing.assert_allclose(fused.score(ids), plain.score(ids), atol=1e-4)


def test_lookup_draft() -> None:
    from edge_llm.speculate import lookup_draft

    assert lookup_draft([1, 2, 3, 9, 9, 1, 2, 3], 3) == [9, 9, 1]
    assert lookup_draft([5, 1, 2, 7, 1, 2], 2) == [7, 1]  # bigram match
    assert lookup_draft([1, 2, 3, 4], 2) == []


@pytest.mark.parametrize("kind", ["tiny_bundle", "tiny_fused", "tiny_fused_all"])
def test_prompt_lookup_speculation_keeps_greedy_output(kind: str, request: pytest.FixtureRequest) -> None:
    from edge_llm.runner import RunnerOptions

    bundle = request.getfixturevalue(kind)
    plain = Engine.load(bundle)
    spec = Engine.load(bundle, RunnerOptions(prompt_lookup=4))
    assert spec.all_logits
    prompt = "def add(a, b):\n    return a + b\n" * 3
    drafted = 0
    for text in (prompt, "The capital of France is Paris. The capital of"):
        ids = plain.encode_request(prompt=text)
        params = SamplingParams(max_tokens=150, ignore_eos=True)
        ref = plain.complete(ids, params)
        gen = spec.start(ids, params)
        while not gen.finished:
            spec.step([gen])
        assert tuple(gen.generated) == ref.token_ids
        assert gen.final().text == ref.text
        drafted += gen.drafted
    assert drafted > 0  # speculation actually ran (its acceptance is the model's business)


def _calls(engine: Engine) -> list[tuple[int, int]]:
    """Record the (rows, S) shape of every forward the runner makes."""
    seen: list[tuple[int, int]] = []
    inner = engine.runner.forward_rows

    def spy(tokens: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        seen.append(tuple(np.asarray(tokens).shape))
        return inner(tokens, *args, **kwargs)

    engine.runner.forward_rows = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("kind", ["tiny_fused", "tiny_fused_last", "tiny_fused_all"])
def test_requests_admitted_together_prefill_in_one_forward(kind: str, request: pytest.FixtureRequest) -> None:
    """Prompts of different lengths, right-padded into one forward, give each sequence exactly
    the tokens it gets alone (greedy and seeded sampling), for every logits kind."""
    engine = Engine.load(request.getfixturevalue(kind))
    texts = ("The capital of France is", "Small models run", "Hi")
    prompts = [engine.encode_request(prompt=p) for p in texts]
    prompts[2] = prompts[0][:2] + prompts[2]  # lengths within the padding bound, not equal
    params = [
        SamplingParams(max_tokens=10, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=10, ignore_eos=True),
    ]
    solo = [engine.complete(ids, p) for ids, p in zip(prompts, params, strict=True)]
    assert len({len(p) for p in prompts}) > 1
    cache = engine.runner.empty(4)
    seqs = [
        Generation(engine, ids, p, Slot(cache=cache, row=row))
        for row, (ids, p) in enumerate(zip(prompts, params, strict=True))
    ]
    calls = _calls(engine)
    engine.start_all(seqs)
    assert calls == [(3, max(len(p) for p in prompts))]  # one padded prefill for all three
    while not all(q.finished for q in seqs):
        engine.step(seqs)
    for s, q in zip(solo, seqs, strict=True):
        assert q.final().token_ids == s.token_ids


def test_prefill_groups_only_adjacent_fresh_rows_with_little_padding(fused: Engine) -> None:
    ids = fused.encode_request(prompt="Small language models run on embedded boards")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    cache = fused.runner.empty(6)
    busy = fused.start(ids, params, Slot(cache=cache, row=1))  # row 1 holds a past
    seqs = [
        Generation(fused, ids, params, Slot(cache=cache, row=0)),
        Generation(fused, ids[:2], params, Slot(cache=cache, row=2)),  # padding would be > 1/3
        Generation(fused, ids, params, Slot(cache=cache, row=3)),
        Generation(fused, ids[:-1], params, Slot(cache=cache, row=4)),
        Generation(fused, ids, params, Slot()),  # a standalone slot
    ]
    groups = fused._prefill_groups(seqs)
    rows = sorted([q.slot.row for q in g] for g in groups if g[0].slot.row is not None)
    assert rows == [[0], [2], [3, 4]]
    assert len(groups) == 4
    fused.start_all(seqs)
    assert all(q.last >= 0 for q in seqs) and busy.slot.cache.lengths[1] == len(ids)


def test_ragged_counts_refused_over_a_past(fused: Engine) -> None:
    cache = fused.runner.empty(2)
    cache.lengths[:] = [3, 0]
    with pytest.raises(ValueError, match="empty rows"):
        fused.runner.forward_rows(np.zeros((2, 4), np.int64), cache, 0, counts=np.array([4, 2]))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_kv_buffers_commit_only_the_pages_written() -> None:
    # 256 MiB laid out like a KV buffer: 512 heads x 512 KiB; the first position of each head
    # written. np.zeros would commit a whole huge page per head where THP is on (256 MiB here).
    buf = lazy_zeros((512, 2048, 64))
    before = _rss_mib()
    buf[:, 0, :] = 1.0
    grown = _rss_mib() - before
    assert buf.flags.writeable and buf.dtype == np.float32
    assert float(buf[:, 1:, :].max()) == 0.0 and float(buf[:, 0, :].min()) == 1.0
    assert grown < 32, f"writing 512 x 256 bytes committed {grown:.0f} MiB"


def test_batch_cache_buffers_are_lazy_zeros(fused: Engine) -> None:
    cache = fused.batch_cache(4)

    def owner(a: np.ndarray) -> object:
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a.base.obj if isinstance(a.base, memoryview) else a.base

    assert all(isinstance(owner(b), mmap.mmap) for b in cache.buffers)
    assert all(not b.any() for b in cache.buffers)
