"""Sessions: SQLite history that survives a restart, KV reuse across turns, the system prompt."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from edge_llm.engine import Engine
from edge_llm.protocol import Request
from edge_llm.scheduler import Event, Scheduler
from edge_llm.sessions import Conversations, StateDB


@pytest.fixture(params=["optimum", "fused"])
def bundle(request: pytest.FixtureRequest) -> Path:
    """Sessions run one at a time on an optimum bundle and in rows of the batch KV cache on a
    fused one (a session's KV is copied into its row and back out after each turn)."""
    return request.getfixturevalue("tiny_bundle" if request.param == "optimum" else "tiny_fused")


def make(bundle: Path, db_path: Path, system_prompt: str = "", max_live: int = 4) -> Scheduler:
    engine = Engine.load(bundle)
    db = StateDB(db_path)
    conv = Conversations(engine, db, system_prompt=system_prompt, max_live=max_live)
    s = Scheduler(engine, conversations=conv, finals=db, max_batch=4)
    assert s.max_batch == (4 if engine.can_batch else 1)
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
        db.put_final(f"r{i}", "me", Event("final", f"r{i}", text=str(i), finish_reason="stop", usage={}))
    db.close()
    assert sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = StateDB(tmp_path / "s.sqlite", max_finals=3)
    assert [m["content"] for m in again.history("a")] == ["hi", "yo", "más 🙂"]
    assert again.history("nobody") == []
    assert again.get_final("r0") is None and again.get_final("r1") is None  # bounded: newest 3 kept
    assert again.get_final("r4") == ("me", Event("final", "r4", text="4", finish_reason="stop", usage={}))
    assert again.prune_sessions(older_than_s=3600) == 0 and again.prune_sessions(older_than_s=-1) == 1
    assert again.history("a") == []


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_files_are_private(tmp_path: Path) -> None:
    """Another local user must not read stored answers: folder 0700, database + WAL + SHM 0600."""
    old = os.umask(0o022)  # the usual umask, which would give 0755 / 0644
    try:
        db = StateDB(tmp_path / "state" / "s.sqlite")
        db.put_final("r", "uid:1", Event("final", "r", text="PIN 4821", finish_reason="stop", usage={}))
        files = [tmp_path / "state" / n for n in ("s.sqlite", "s.sqlite-wal", "s.sqlite-shm")]
        assert mode(tmp_path / "state") == 0o700 and [mode(f) for f in files] == [0o600] * 3
        db.close()
        # A file left readable by an older version is tightened when opened again; so is the
        # folder when it is the server's own state dir.
        for path in (tmp_path / "state", *files[:1]):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        StateDB(files[0]).close()
        assert mode(files[0]) == 0o600 and mode(tmp_path / "state") == 0o755  # not ours to change
        StateDB(files[0], private_dir=True).close()
        assert mode(tmp_path / "state") == 0o700
    finally:
        os.umask(old)


def test_finals_of_an_older_database_belong_to_nobody(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE finals (id TEXT PRIMARY KEY, reply TEXT NOT NULL, created REAL NOT NULL)")
    reply = {"id": "r", "done": True, "text": "t", "finish_reason": "stop"}
    con.execute("INSERT INTO finals VALUES ('r', ?, 0)", (json.dumps(reply),))
    con.commit()
    con.close()
    db = StateDB(path)
    stored = db.get_final("r")
    assert stored is not None and stored[0] == "" and stored[1].text == "t"
    db.put_final("s", "uid:7", Event("error", "s", code="cancelled", message="m"))
    assert db.get_final("s") == ("uid:7", Event("error", "s", code="cancelled", message="m"))
    db.close()


def test_second_turn_reuses_the_kv_cache_and_survives_a_restart(bundle: Path, tmp_path: Path) -> None:
    db_path = tmp_path / "state.sqlite"
    s = make(bundle, db_path)
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
    s = make(bundle, db_path)
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


def test_system_prompt_is_prefilled_once_and_reused(bundle: Path, tmp_path: Path) -> None:
    system = "You are a terse assistant on a small board. Answer in one short line."
    s = make(bundle, tmp_path / "state.sqlite", system_prompt=system)
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


def test_live_slots_are_a_bounded_lru(bundle: Path, tmp_path: Path) -> None:
    s = make(bundle, tmp_path / "state.sqlite", max_live=1)
    turn(s, "a1", "one", session="A", max_tokens=4)
    turn(s, "b1", "two", session="B", max_tokens=4)  # evicts A's slot
    a2 = turn(s, "a2", "three", session="A", max_tokens=4)
    a3 = turn(s, "a3", "four", session="A", max_tokens=4)
    assert a2.usage is not None and a2.usage["cached_tokens"] == 0  # recomputed from history
    assert a3.usage is not None and a3.usage["cached_tokens"] > 0  # A is live again
    assert list(s.conversations._live) == ["A"]
    close(s)


def test_a_long_conversation_slides_its_window(bundle: Path, tmp_path: Path) -> None:
    """Past the context window, old turns leave the prompt (not the database)."""
    s = make(bundle, tmp_path / "state.sqlite")
    for i in range(8):
        e = turn(s, f"w{i}", f"turn number {i}", max_tokens=40, ignore_eos=True)
        assert e.usage is not None and e.usage["prompt_tokens"] + 40 <= s.engine.max_context
    assert len(s.conversations.history("chat")) == 16
    close(s)


def test_concurrent_sessions_share_a_batch_and_keep_their_own_kv(tiny_fused: Path, tmp_path: Path) -> None:
    """Two conversations whose turns run in the same decode steps (rows of one batch cache):
    each next turn reuses its own session's KV and answers as it would alone."""
    s = make(tiny_fused, tmp_path / "state.sqlite")
    turns = [("a1", "first chat", "A"), ("b1", "second chat", "B"), ("a2", "more", "A"), ("b2", "again", "B")]
    results: dict[str, Event] = {}
    for pair in (turns[:2], turns[2:]):
        # Hold the worker (its sink blocks) so that both turns are queued and admitted together.
        release, held = threading.Event(), threading.Event()

        def hold(_e: Event, release: threading.Event = release, held: threading.Event = held) -> None:
            held.set()
            release.wait(30)

        s.submit(Request(id=f"hold-{pair[0][0]}", prompt="x", max_tokens=1, ignore_eos=True), hold)
        assert held.wait(30)
        done = {rid: threading.Event() for rid, _, _ in pair}
        for rid, text, session in pair:

            def sink(e: Event, rid: str = rid, finished: threading.Event = done[rid]) -> None:
                if e.done:
                    results[rid] = e
                    finished.set()

            message = ({"role": "user", "content": text},)
            s.submit(Request(id=rid, messages=message, session=session, max_tokens=12, ignore_eos=True), sink)
        release.set()
        assert all(d.wait(30) for d in done.values())
    assert s.stats["peak_batch"] >= 2
    assert all(results[rid].kind == "final" for rid, _, _ in turns)
    for rid in ("a2", "b2"):
        usage = results[rid].usage
        assert usage is not None and usage["cached_tokens"] > 0  # its own session's KV, reused
    close(s)
    # Alone, one request at a time, the same turns give the same answers (greedy).
    solo = make(tiny_fused, tmp_path / "solo.sqlite")
    for rid, text, session in turns:
        alone = turn(solo, rid, text, session=session, max_tokens=12, ignore_eos=True)
        assert alone.text == results[rid].text
    close(solo)
