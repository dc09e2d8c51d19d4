"""The memory budget: plan_memory sizes rows / context / sessions to fit, refuses what cannot fit,
and the engine, scheduler and sessions then stay inside the plan."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_llm.board import BoardConfig, RunnerOptions, SessionsConfig
from edge_llm.bundle import Architecture, Bundle, load_bundle
from edge_llm.config import from_dict
from edge_llm.engine import Engine, Slot
from edge_llm.errors import ConfigError
from edge_llm.memory import MIB, plan_memory
from edge_llm.protocol import Request
from edge_llm.sampling import SamplingParams
from edge_llm.scheduler import Event, Scheduler
from edge_llm.sessions import Conversations

BOARD = BoardConfig(runtime=RunnerOptions(max_batch=8), sessions=SessionsConfig(max_live=2))


def smallest_in(exc: pytest.ExceptionInfo[ConfigError]) -> int:
    found = re.search(r"smallest budget that works is (\d+) MB", str(exc.value))
    assert found, str(exc.value)
    return int(found.group(1))


def smollm2_sized(tiny: Bundle) -> Bundle:
    """The tiny bundle's manifest with SmolLM2-135M's shapes and file sizes (no graph is loaded)."""
    arch = Architecture("llama", 30, 9, 3, 64, 576, 49152, 2048)
    files = {
        "model.onnx": {"bytes": 117_352},
        "model.onnx.data": {"bytes": 174_073_088},
        "tokenizer.json": {"bytes": 3_523_711},
    }
    graph = dataclasses.replace(tiny.graph, file="model.onnx")
    tokenizer = dataclasses.replace(tiny.tokenizer, file="tokenizer.json")
    return dataclasses.replace(tiny, architecture=arch, files=files, graph=graph, tokenizer=tokenizer)


def test_too_small_a_budget_is_refused_with_the_smallest_that_works(tiny_fused: Path) -> None:
    bundle = load_bundle(tiny_fused)
    with pytest.raises(ConfigError) as exc:
        plan_memory(bundle, BOARD, 10)
    smallest = smallest_in(exc)
    plan = plan_memory(bundle, BOARD, smallest)
    assert plan.rows >= 1 and plan.total_mb <= smallest
    with pytest.raises(ConfigError):
        plan_memory(bundle, BOARD, smallest - 1)


def test_a_smaller_budget_gives_fewer_rows_or_a_shorter_context(tiny_fused: Path) -> None:
    bundle = smollm2_sized(load_bundle(tiny_fused))
    roomy = plan_memory(bundle, BOARD, 4000, structured=False)
    assert (roomy.rows, roomy.context, roomy.sessions) == (8, 2048, 2)
    tight = plan_memory(bundle, BOARD, 400, structured=False)
    assert tight.context < roomy.context and tight.rows <= roomy.rows
    mid = plan_memory(bundle, BOARD, 1024, structured=False)
    assert mid.rows < roomy.rows and mid.context == 2048
    # the KV per token comes from the layout: layers x K,V x kv heads x head_dim x float32
    assert tight.kv_token_kib == 30 * 2 * 3 * 64 * 4 / 1024


def test_the_plan_never_exceeds_the_budget(tiny_fused: Path) -> None:
    tiny = load_bundle(tiny_fused)
    for bundle in (tiny, smollm2_sized(tiny)):
        with pytest.raises(ConfigError) as exc:
            plan_memory(bundle, BOARD, 1)
        smallest = smallest_in(exc)
        last_rows = last_context = 0
        for budget in range(smallest, smallest + 1500, 7):
            plan = plan_memory(bundle, BOARD, budget)
            assert plan.total_mb <= budget, (budget, plan)
            assert 1 <= plan.rows <= 8 and 0 <= plan.sessions <= 2
            assert plan.context <= bundle.architecture.context_length
            # more budget never plans a shorter context, nor fewer rows at the same context
            assert plan.context >= last_context
            if plan.context == last_context:
                assert plan.rows >= last_rows
            last_rows, last_context = plan.rows, plan.context


def test_no_budget_shows_what_the_limits_need(tiny_fused: Path) -> None:
    bundle = smollm2_sized(load_bundle(tiny_fused))
    plan = plan_memory(bundle, BOARD, 0)
    assert (plan.rows, plan.context, plan.sessions, plan.prefill_chunk) == (8, 2048, 2, 0)
    assert plan.kv_mb == pytest.approx(10 * 90.0)  # 8 rows + 2 sessions at 45 KiB x 2048 tokens
    assert any("total" in line for line in plan.lines())


def test_structured_output_is_costed_where_llguidance_is_installed(tiny_fused: Path) -> None:
    """llguidance's ~66 MiB for SmolLM2's tokenizer (measured: benchmarks/memory_costs.py) counts
    when a request can ask for JSON; a budget then fits less."""
    import importlib.util

    bundle = smollm2_sized(load_bundle(tiny_fused))
    off, on = (plan_memory(bundle, BOARD, 0, structured=s) for s in (False, True))
    assert off.structured_mb == 0 and 66 <= on.structured_mb <= 70
    assert on.fixed_mb - off.fixed_mb == pytest.approx(on.structured_mb)
    assert any(line.lstrip().startswith("structured output") for line in on.lines())
    installed = importlib.util.find_spec("llguidance") is not None
    assert (plan_memory(bundle, BOARD, 0).structured_mb > 0) == installed  # the default
    with pytest.raises(ConfigError) as exc:
        plan_memory(bundle, BOARD, 10, structured=False)
    smallest = smallest_in(exc)
    with pytest.raises(ConfigError) as exc:  # what fitted without llguidance does not with it
        plan_memory(bundle, BOARD, smallest, structured=True)
    assert smallest_in(exc) >= smallest + 60 and "structured output 68 MB (llguidance" in str(exc.value)


def test_the_planned_engine_allocates_no_more_kv_than_planned(tiny_fused: Path) -> None:
    bundle = load_bundle(tiny_fused)
    board = BoardConfig(runtime=RunnerOptions(max_batch=8, memory_mb=1), sessions=SessionsConfig(max_live=2))
    with pytest.raises(ConfigError) as exc:
        plan_memory(bundle, board)
    plan = plan_memory(bundle, board, smallest_in(exc) + 1)
    planned = plan.apply(board)
    assert planned.runtime.max_batch == plan.rows and planned.sessions.max_live == plan.sessions
    engine = Engine(bundle, planned.runner_options())
    assert engine.max_context == plan.context
    scheduler = Scheduler(engine)
    assert scheduler.max_batch == plan.rows
    cache = engine.batch_cache(scheduler.max_batch)
    # the whole batch cache (every page it could ever commit) fits the plan's KV rows
    assert sum(b.nbytes for b in cache.buffers) <= plan.rows * plan.kv_row_mb * MIB


@pytest.mark.parametrize("kind", ["tiny_fused", "tiny_bundle"])  # shared and concat KV layouts
def test_prefill_in_pieces_gives_the_same_tokens(kind: str, request: pytest.FixtureRequest) -> None:
    bundle = load_bundle(request.getfixturevalue(kind))
    whole = Engine(bundle, RunnerOptions(max_batch=1))
    pieces = Engine(bundle, RunnerOptions(max_batch=1, prefill_chunk=7))
    ids = whole.encode_request(prompt="The capital of France is Paris. The capital of Italy is Rome. " * 3)
    assert len(ids) > 21
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a, b = whole.complete(ids, params), pieces.complete(ids, params)
    assert a.token_ids == b.token_ids
    slot_a, slot_b = Slot(), Slot()
    la, _ = whole.prefill(ids, slot_a)
    lb, _ = pieces.prefill(ids, slot_b)
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)


def test_batched_prefill_groups_stay_within_a_piece(tiny_fused: Path) -> None:
    bundle = load_bundle(tiny_fused)
    engine = Engine(bundle, RunnerOptions(max_batch=4, prefill_chunk=8))
    cache = engine.batch_cache(4)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    from edge_llm.engine import Generation

    seqs = []
    for row, text in enumerate(["hi", "hello", "hey there", "hola"]):
        ids = engine.encode_request(prompt=text)
        seqs.append(Generation(engine, ids, params, engine.attach(Slot(), cache, row)))
    for group in engine._prefill_groups(seqs):
        if len(group) > 1:
            assert len(group) * max(len(q.ids) for q in group) <= 8


def test_detach_reuses_the_sessions_own_cache(tiny_fused: Path) -> None:
    engine = Engine(load_bundle(tiny_fused), RunnerOptions(max_batch=2))
    cache = engine.batch_cache(2)
    session = Slot()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    ids = engine.encode_request(prompt="The capital of France")
    first = engine.start(ids, params, engine.attach(session, cache, 0))
    engine.step([first])
    engine.detach(first.slot, session)
    kept, turn = session.cache, len(session.ids)
    assert kept is not None and list(session.ids) == list(first.slot.ids)
    second = engine.start([*session.ids, *ids], params, engine.attach(session, cache, 1))
    assert second.cached == turn  # the first turn's KV came along into the batch row
    engine.step([second])
    engine.detach(second.slot, session)
    assert session.cache is kept  # the same single-row buffers: no second allocation
    assert int(kept.lengths[0]) == len(second.slot.ids)


def test_memory_mb_is_a_runtime_key_and_providers_are_not(tmp_path: Path) -> None:
    board = from_dict(BoardConfig, {"runtime": {"memory_mb": 512, "prefill_chunk": 128}})
    assert board.runtime.memory_mb == 512 and board.runner_options().prefill_chunk == 128
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(BoardConfig, {"runtime": {"providers": []}})
    with pytest.raises(ConfigError, match="memory_mb"):
        from_dict(BoardConfig, {"runtime": {"memory_mb": -1}})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_llm.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_generate_refuses_a_budget_that_cannot_fit_and_runs_one_that_can(tiny_fused: Path) -> None:
    proc = run_cli("generate", "--bundle", str(tiny_fused), "--memory-mb", "20", "hi")
    assert proc.returncode == 2 and "smallest budget that works is" in proc.stderr
    smallest = int(re.search(r"works is (\d+) MB", proc.stderr).group(1))
    budget = str(smallest)
    proc = run_cli("generate", "--bundle", str(tiny_fused), "--memory-mb", budget, "--max-tokens", "3", "hi")
    assert proc.returncode == 0, proc.stderr
    assert f"memory plan ({smallest} MB budget)" in proc.stderr


def test_doctor_prints_the_plan(tiny_fused: Path) -> None:
    proc = run_cli("doctor", "--bundle", str(tiny_fused))
    assert proc.returncode == 0, proc.stderr
    assert "memory plan for" in proc.stdout and "KV cache" in proc.stdout and "live sessions" in proc.stdout


def chat_turn(s: Scheduler, rid: str, text: str, session: str) -> Event:
    done, out = threading.Event(), []

    def sink(e: Event) -> None:
        if e.done:
            out.append(e)
            done.set()

    messages = ({"role": "user", "content": text},)
    s.submit(Request(id=rid, messages=messages, session=session, max_tokens=5), sink)
    assert done.wait(60)
    assert out[0].kind == "final", out[0]
    return out[0]


def test_a_session_turn_reuses_the_evicted_sessions_buffers(tiny_fused: Path) -> None:
    """With max_live sessions the process holds max_live session caches, not one more per turn."""
    engine = Engine.load(tiny_fused, RunnerOptions(max_batch=2))
    s = Scheduler(engine, conversations=Conversations(engine, max_live=1))
    s.start()
    try:
        chat_turn(s, "a1", "one", "A")
        buffers = s.conversations._live["A"].cache
        b1 = chat_turn(s, "b1", "two", "B")
        assert list(s.conversations._live) == ["B"] and s.conversations._live["B"].cache is buffers
        a2 = chat_turn(s, "a2", "three", "A")
        assert a2.usage is not None and a2.usage["cached_tokens"] == 0  # recomputed from history
        assert s.conversations._live["A"].cache is buffers
    finally:
        s.close(grace_s=1)
    fresh = Scheduler(engine, conversations=Conversations(engine, max_live=1))
    fresh.start()
    try:  # the recycled buffers gave the same answer as fresh ones
        assert chat_turn(fresh, "b1", "two", "B").text == b1.text
    finally:
        fresh.close(grace_s=1)


def test_serve_refuses_a_budget_that_cannot_fit_before_serving(tiny_fused: Path, tmp_path: Path) -> None:
    sock = tmp_path / "edge.sock"
    proc = run_cli("serve", "--bundle", str(tiny_fused), "--memory-mb", "20", "--socket", str(sock))
    assert proc.returncode == 2 and "smallest budget that works is" in proc.stderr
    assert not sock.exists()
