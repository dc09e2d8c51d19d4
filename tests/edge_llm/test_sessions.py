"""Sessions: SQLite history that survives a restart, KV reuse across turns, the system prompt."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from edge_llm.engine import Engine
from edge_llm.protocol import Request
from edge_llm.scheduler import Event, Scheduler
from edge_llm.sessions import Conversations, StateDB


def make(tiny_bundle: Path, db_path: Path, system_prompt: str = "", max_live: int = 4) -> Scheduler:
    engine = Engine.load(tiny_bundle)
    db = StateDB(db_path)
    conv = Conversations(engine, db, system_prompt=system_prompt, max_live=max_live)
    s = Scheduler(engine, conversations=conv, finals=db)
    s.start()
    return s


def turn(s: Scheduler, rid: str, text: str, session: str | None = "chat", **kw: object) -> Event:
    done = threading.Event()
    out: list[Event] = []

    def sink(e: Event) -> None:
        if e.done:
            out.append(e)
            done.set()

    request = Request(id=rid, messages=({"role": "user", "content": text},), session=session, **kw)  # type: ignore[arg-type]
    s.submit(request, sink)
    assert done.wait(30)
    assert out[0].kind == "final", out[0]
    return out[0]


def close(s: Scheduler) -> None:
    s.close(grace_s=1)
    assert isinstance(s.finals, StateDB)
    s.finals.close()


def test_state_db_is_wal_and_persistent(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.sqlite", max_finals=3)
    db.append("a", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    db.append("a", [{"role": "user", "content": "más 🙂"}])
    for i in range(5):
        db.put_final(f"r{i}", {"id": f"r{i}", "done": True, "text": str(i)})
    db.close()
    assert sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = StateDB(tmp_path / "s.sqlite", max_finals=3)
    assert [m["content"] for m in again.history("a")] == ["hi", "yo", "más 🙂"]
    assert again.history("nobody") == []
    assert again.get_final("r0") is None and again.get_final("r1") is None  # bounded: newest 3 kept
    assert again.get_final("r4") == {"id": "r4", "done": True, "text": "4"}
    assert again.prune_sessions(older_than_s=3600) == 0 and again.prune_sessions(older_than_s=-1) == 1
    assert again.history("a") == []


def test_second_turn_reuses_the_kv_cache_and_survives_a_restart(tiny_bundle: Path, tmp_path: Path) -> None:
    db_path = tmp_path / "state.sqlite"
    s = make(tiny_bundle, db_path)
    first = turn(s, "t1", "What is the capital of France?", max_tokens=6)
    second = turn(s, "t2", "And of Italy?", max_tokens=6)
    assert first.usage is not None and second.usage is not None
    assert first.usage["cached_tokens"] == 0
    # Turn 2's prompt holds turn 1 (longer than it), and its prefix came from the live slot.
    assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"] + 3
    assert second.usage["cached_tokens"] >= first.usage["prompt_tokens"]
    assert second.session == "chat"
    close(s)

    # A new runtime (new engine, no live slots) on the same database: the history is there.
    s = make(tiny_bundle, db_path)
    third = turn(s, "t3", "Thanks!", max_tokens=6)
    assert third.usage is not None
    assert third.usage["cached_tokens"] == 0  # nothing live after a restart: prefilled from history
    assert third.usage["prompt_tokens"] > second.usage["prompt_tokens"]
    roles = [m["role"] for m in s.conversations.history("chat")]
    assert roles == ["user", "assistant"] * 3
    # And the finals persisted too: a repeat of t1 is answered from the store, not generated.
    replay = turn(s, "t1", "What is the capital of France?", max_tokens=6)
    assert replay.replayed and replay.text == first.text and s.stats["runs"] == 1
    close(s)


def test_system_prompt_is_prefilled_once_and_reused(tiny_bundle: Path, tmp_path: Path) -> None:
    system = "You are a terse assistant on a small board. Answer in one short line."
    s = make(tiny_bundle, tmp_path / "state.sqlite", system_prompt=system)
    a = turn(s, "a1", "hi", session="A", max_tokens=4)
    template = s.conversations._system_slot
    b = turn(s, "b1", "hello", session="B", max_tokens=4)
    one_shot = turn(s, "o1", "hey", session=None, max_tokens=4)
    assert template is not None and s.conversations._system_slot is template  # built once
    n = len(template.ids)
    assert n > 10
    for e in (a, b, one_shot):
        assert e.usage is not None and e.usage["cached_tokens"] >= n - 1
    # Copy-on-use: the template still holds exactly the system prompt after three requests.
    assert template.cache is not None and int(template.cache.lengths[0]) == n
    history = s.conversations.history("A")
    assert history[0] == {"role": "system", "content": system} and len(history) == 3
    close(s)


def test_live_slots_are_a_bounded_lru(tiny_bundle: Path, tmp_path: Path) -> None:
    s = make(tiny_bundle, tmp_path / "state.sqlite", max_live=1)
    turn(s, "a1", "one", session="A", max_tokens=4)
    turn(s, "b1", "two", session="B", max_tokens=4)  # evicts A's slot
    a2 = turn(s, "a2", "three", session="A", max_tokens=4)
    a3 = turn(s, "a3", "four", session="A", max_tokens=4)
    assert a2.usage is not None and a2.usage["cached_tokens"] == 0  # recomputed from history
    assert a3.usage is not None and a3.usage["cached_tokens"] > 0  # A is live again
    assert list(s.conversations._live) == ["A"]
    close(s)


def test_a_long_conversation_slides_its_window(tiny_bundle: Path, tmp_path: Path) -> None:
    """Past the context window, old turns leave the prompt (not the database)."""
    s = make(tiny_bundle, tmp_path / "state.sqlite")
    for i in range(8):
        e = turn(s, f"w{i}", f"turn number {i}", max_tokens=40, ignore_eos=True)
        assert e.usage is not None and e.usage["prompt_tokens"] + 40 <= s.engine.max_context
    assert len(s.conversations.history("chat")) == 16
    close(s)
