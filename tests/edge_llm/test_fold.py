"""Newcomers' prompts folded into the running rows' decode steps (edge_llm/batching.py) on the
query_seqlens graph: the same tokens as running alone, and no batch-1 prefill forward."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_llm import batching, speculate
from edge_llm.board import RunnerOptions
from edge_llm.bundle import version_tuple
from edge_llm.engine import Engine, Generation, Slot
from edge_llm.protocol import Request
from edge_llm.sampling import SamplingParams
from edge_llm.scheduler import Scheduler

pytestmark = pytest.mark.skipif(
    version_tuple(ort.__version__) < (1, 32), reason="query_seqlens needs onnxruntime >= 1.32"
)

TEXTS = [
    "The capital of France is",
    "Small language models run on embedded boards with ONNX Runtime and",
    "def add(a, b):",
    "Grüße aus München! The capital of Italy is Rome. The capital of France is Paris, and",
]


FOLD = 64  # [runtime] fold_max: prompts up to this many tokens fold


@pytest.fixture(scope="module")
def engine(tiny_fused_variants: Path) -> Engine:
    e = Engine.load(tiny_fused_variants, RunnerOptions(fold_max=FOLD))
    assert e.runner.ragged
    return e


def _calls(engine: Engine) -> list[tuple[int, int]]:
    """Shapes of every forward the runner makes from now on (the list fills as they run)."""
    calls: list[tuple[int, int]] = []
    inner = engine.runner.forward_rows

    def spy(tokens: np.ndarray, *a: object, **k: object) -> np.ndarray:
        calls.append(tuple(tokens.shape))
        return inner(tokens, *a, **k)

    engine.runner.forward_rows = spy  # type: ignore[method-assign]
    return calls


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=14, ignore_eos=True),
        SamplingParams(max_tokens=18, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=6, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.1, top_k=30, seed=8, ignore_eos=True),
    ]


@pytest.mark.parametrize("padding", [0, 24])
def test_folded_newcomers_match_solo_runs(tiny_fused_variants: Path, padding: int) -> None:
    engine = Engine.load(tiny_fused_variants, RunnerOptions(fold_max=FOLD, fold_padding=padding))
    prompts = [engine.encode_request(prompt=t) for t in TEXTS]
    assert max(len(p) for p in prompts) <= FOLD
    params = _params()
    solo = [engine.complete(ids, p) for ids, p in zip(prompts, params, strict=True)]
    assert len(prompts[3]) > batching.fold_piece(4, 10**6, 10**6, padding)  # takes several folded steps
    cache = engine.runner.empty(4)
    seqs = [Generation(engine, prompts[0], params[0], Slot(cache=cache, row=0))]
    engine.start_all(seqs)
    for _ in range(3):
        engine.step(seqs)
    calls = _calls(engine)
    late = [Generation(engine, prompts[r], params[r], Slot(cache=cache, row=r)) for r in (1, 2, 3)]
    engine.start_all(late, fold=True)
    assert calls == [] and all(q.last < 0 for q in late)  # nothing ran: their prompts wait
    seqs += late
    while not all(q.finished for q in seqs):
        engine.step(seqs)
    for s, q in zip(solo, seqs, strict=True):
        assert q.final().token_ids == s.token_ids
    # the newcomers never prefilled alone: one token per row per step, or padded pieces
    assert not any(rows == 1 and width > 1 for rows, width in calls)
    if padding:  # padded pieces; with 0, wider forwards only once no row decodes (prompts go whole)
        assert any(width > 1 for _, width in calls)
    engine.runner.forward_rows = type(engine.runner).forward_rows.__get__(engine.runner)


def test_fold_reuses_a_sessions_cached_prefix(engine: Engine) -> None:
    """A session's next turn attached to a row keeps its cached prefix and folds only the rest."""
    first = engine.encode_request(prompt=TEXTS[1])
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    own = Slot()
    done = engine.complete(first, p, own)
    turn = [*first, *done.token_ids, *engine.encode_request(prompt=" and then")]
    want = engine.complete(turn, p, engine.fork_slot(own)).token_ids
    cache = engine.runner.empty(2)
    long = SamplingParams(max_tokens=20, ignore_eos=True)
    runner = Generation(engine, first, long, Slot(cache=cache, row=0))
    engine.start_all([runner])
    q = Generation(engine, turn, p, engine.attach(own, cache, 1))
    engine.start_all([q], fold=True)
    assert q.cached == len(own.ids)
    while not q.finished:
        engine.step([runner, q])
    assert q.final().token_ids == want


def test_a_newcomer_still_taking_its_prompt_does_not_speculate(
    tiny_fused_variants: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt lookup on: the running row finishes while a folded newcomer's prompt is half in, so
    the newcomer is alone (a lone row may speculate) but has no last token to draft from: it
    takes the rest of its prompt first, then speculates, with the tokens of a solo run."""
    # Always a draft (the context's last tokens): every step that may speculate does.
    monkeypatch.setattr(speculate, "lookup_draft", lambda context, k, **_: list(context[-k:]))
    e = Engine.load(tiny_fused_variants, RunnerOptions(fold_max=FOLD, prompt_lookup=4))
    assert e.runner.ragged and e.lookup and e.draft is None
    ids = e.encode_request(prompt=TEXTS[3])
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    want = e.complete(ids, greedy)
    assert want.usage.draft_verifies > 0
    cache = e.runner.empty(2)
    first = Generation(e, e.encode_request(prompt=TEXTS[0]), SamplingParams(max_tokens=2), Slot(cache, [], 0))
    e.start_all([first])
    q = Generation(e, ids, greedy, Slot(cache, [], 1))
    e.start_all([q], fold=True)
    steps = 0
    while not first.finished:
        e.step([first, q])
        steps += 1
    assert batching.pending(q) and len(q.slot.ids) == steps < len(ids)  # one prompt token a step
    e.step([first, q])  # alone now, still pending: the rest of the prompt goes in, no verify
    assert not batching.pending(q) and q.verifies == 0 and len(q.generated) == 1
    while not q.finished:
        e.step([first, q])
    assert q.final().token_ids == want.token_ids and q.verifies > 0


@pytest.mark.parametrize("fold_max", [0, 4])
def test_long_prompts_and_the_default_prefill_alone(tiny_fused_variants: Path, fold_max: int) -> None:
    e = Engine.load(tiny_fused_variants, RunnerOptions(fold_max=fold_max))
    assert e.runner.ragged
    cache = e.runner.empty(2)
    ids = e.encode_request(prompt=TEXTS[1])
    assert len(ids) > 4
    q = Generation(e, ids, SamplingParams(max_tokens=3), Slot(cache=cache, row=1))
    e.start_all([q], fold=True)
    assert q.last >= 0 and int(cache.lengths[1]) == len(ids)  # prefilled at once


def test_portable_graph_does_not_fold(tiny_fused_variants: Path) -> None:
    e = Engine.load(tiny_fused_variants, RunnerOptions(ragged=False, fold_max=FOLD))
    cache = e.runner.empty(2)
    ids = e.encode_request(prompt=TEXTS[0])
    q = Generation(e, ids, SamplingParams(max_tokens=3), Slot(cache=cache, row=1))
    e.start_all([q], fold=True)
    assert q.last >= 0  # prefilled at once, as before


def test_scheduler_folds_requests_that_arrive_mid_stream(engine: Engine) -> None:
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 10, 10)]
    prompts = [engine.encode_request(prompt=t) for t in TEXTS[:3]]
    solo = [engine.complete(ids, p).text for ids, p in zip(prompts, params, strict=True)]
    calls = _calls(engine)
    # The worker's 4th forward waits until both newcomers are queued: on a loaded machine the test
    # thread can sleep past the first request's 40 tokens, and the newcomers would prefill alone.
    queued = threading.Event()
    spied = engine.runner.forward_rows

    def held(tokens: np.ndarray, *a: object, **k: object) -> np.ndarray:
        if len(calls) == 3:
            queued.wait(60)
        return spied(tokens, *a, **k)

    engine.runner.forward_rows = held  # type: ignore[method-assign]
    sched = Scheduler(engine, max_queue=4, max_inflight_per_client=4, max_batch=4)
    finals: dict[str, list[int]] = {}
    done = threading.Event()
    sched.start()
    try:

        def submit(i: int) -> None:
            request = Request(id=f"r{i}", prompt=TEXTS[i], max_tokens=params[i].max_tokens, ignore_eos=True)

            def sink(event: object) -> None:
                if getattr(event, "kind", "") == "final":
                    finals[event.id] = event  # type: ignore[attr-defined]
                    if len(finals) == 3:
                        done.set()

            sched.submit(request, sink)

        submit(0)
        end = time.monotonic() + 60
        while len(calls) < 3:  # the first request is decoding (prefill + 2 steps; the 4th waits)
            assert time.monotonic() < end, "the first request never started decoding"
            threading.Event().wait(0.005)
        submit(1)
        submit(2)
        queued.set()
        assert done.wait(60)
    finally:
        sched.close()
    for i in range(3):
        assert finals[f"r{i}"].text == solo[i]  # type: ignore[attr-defined]
    assert [c for c in calls if c[0] == 1 and c[1] > 1] == [(1, len(prompts[0]))]  # only the first
    engine.runner.forward_rows = type(engine.runner).forward_rows.__get__(engine.runner)


def test_fold_options_come_from_the_board_profile(tmp_path: Path) -> None:
    from edge_llm.board import load_board
    from edge_llm.errors import ConfigError

    board = tmp_path / "b.toml"
    board.write_text("[runtime]\nfold_max = 32\nfold_padding = 8\n")
    options = load_board(board).runner_options()
    assert (options.fold_max, options.fold_padding) == (32, 8)
    board.write_text("[runtime]\nfold_padding = -1\n")
    with pytest.raises(ConfigError, match="fold_padding must be ≥ 0"):
        load_board(board)
