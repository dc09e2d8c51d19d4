"""State that outlives a request: conversation history, recent final replies, live KV slots.

In: an `Engine`, an optional SQLite path, a system prompt. Out:
- `StateDB`: one SQLite file (WAL, synchronous=FULL) holding each session's messages and the
  recent final replies (bounded) used to answer a repeated request id without generating again.
  A restart of the runtime loses neither. `FinalStore` is what the scheduler asks of it;
  `MemoryFinals` is the bounded in-memory store used when no database is given.
- `Conversations`: turns a `Request` into prompt token ids plus the `Slot` to run them in. A
  session's next turn reuses that session's live Slot (bounded LRU), so only the new suffix is
  prefilled; a configured system prompt is prefilled once into a template Slot and each new
  sequence starts from a copy of it.

Threads: `Conversations` drives the engine and must only be called from the scheduler's worker
thread. `StateDB` is safe from any thread (one connection behind a lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_llm.engine import Engine, Slot
from edge_llm.errors import ConfigError, RequestError
from edge_llm.protocol import Event, Request, event_from_reply, reply

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session, seq)
);
CREATE TABLE IF NOT EXISTS finals (
    id TEXT PRIMARY KEY,
    reply TEXT NOT NULL,
    created REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
"""


class FinalStore(Protocol):
    """Finished requests by id: (the identity that owns it, its final or error event)."""

    def get_final(self, request_id: str) -> tuple[str, Event] | None: ...
    def put_final(self, request_id: str, owner: str, event: Event) -> None: ...


class MemoryFinals:
    """Bounded in-memory final store (the default when no database is given)."""

    def __init__(self, max_finals: int = 1000) -> None:
        self.max_finals = max_finals
        self._finals: OrderedDict[str, tuple[str, Event]] = OrderedDict()
        self._lock = threading.Lock()

    def get_final(self, request_id: str) -> tuple[str, Event] | None:
        with self._lock:
            return self._finals.get(request_id)

    def put_final(self, request_id: str, owner: str, event: Event) -> None:
        with self._lock:
            self._finals[request_id] = (owner, event)
            self._finals.move_to_end(request_id)
            while len(self._finals) > self.max_finals:
                self._finals.popitem(last=False)


class StateDB:
    """Session history and recent final replies in one SQLite file, readable by its owner only.

    The folder is created 0700 and the file 0600 before SQLite opens it: SQLite gives the WAL
    and SHM files the database file's mode, so they are 0600 as well. An existing file (and its
    WAL/SHM) is tightened to 0600; `private_dir` tightens an existing folder to 0700 too (the
    server's own state_dir — never a folder the user merely put the file in, such as /tmp).
    """

    def __init__(self, path: str | Path, max_finals: int = 1000, private_dir: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.max_finals = max_finals
        try:
            _make_private(self.path, private_dir)
            # Autocommit mode: every statement is its own transaction unless we open one; the
            # lock (not sqlite's thread check) serialises the transport and worker threads.
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a turn acknowledged to the client survives a power cut, at one fsync per turn.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(finals)")}
            if "owner" not in columns:  # a file from before finals had owners: theirs is '' (nobody's)
                self._db.execute("ALTER TABLE finals ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"{self.path}: cannot open the state database: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- sessions --

    def history(self, session: str) -> list[dict[str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT role, content FROM messages WHERE session = ? ORDER BY seq", (session,)
            ).fetchall()
        return [{"role": r, "content": c} for r, c in rows]

    def append(self, session: str, messages: list[dict[str, str]]) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (last,) = self._db.execute(
                    "SELECT COALESCE(MAX(seq), -1) FROM messages WHERE session = ?", (session,)
                ).fetchone()
                self._db.executemany(
                    "INSERT INTO messages (session, seq, role, content, created) VALUES (?, ?, ?, ?, ?)",
                    [(session, last + 1 + i, m["role"], m["content"], now) for i, m in enumerate(messages)],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prune_sessions(self, older_than_s: float) -> int:
        """Delete sessions whose last message is older than `older_than_s`; return how many."""
        cutoff = time.time() - older_than_s
        with self._lock:
            old = [
                s
                for (s,) in self._db.execute(
                    "SELECT session FROM messages GROUP BY session HAVING MAX(created) < ?", (cutoff,)
                )
            ]
            self._db.executemany("DELETE FROM messages WHERE session = ?", [(s,) for s in old])
        return len(old)

    # -- finals (request-id deduplication) --

    def get_final(self, request_id: str) -> tuple[str, Event] | None:
        """(owner identity, event) of a finished request."""
        with self._lock:
            row = self._db.execute("SELECT owner, reply FROM finals WHERE id = ?", (request_id,)).fetchone()
        return (row[0], event_from_reply(json.loads(row[1]))) if row else None

    def put_final(self, request_id: str, owner: str, event: Event) -> None:
        # Kept in its wire form: a documented format, so the file outlives changes to Event.
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO finals (id, reply, created, owner) VALUES (?, ?, ?, ?)",
                (request_id, json.dumps(reply(event), ensure_ascii=False), time.time(), owner),
            )
            # Bounded: keep the newest max_finals (rowid grows with every insert or replace).
            self._db.execute(
                "DELETE FROM finals WHERE rowid <= (SELECT MAX(rowid) FROM finals) - ?", (self.max_finals,)
            )


def _make_private(path: Path, private_dir: bool) -> None:
    """The database's folder 0700 (when we create it, or when it is ours) and file 0600."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    elif private_dir:
        os.chmod(folder, 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # created 0600 whatever the umask
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if name.stat().st_mode & 0o077:
                os.chmod(name, 0o600)


@dataclass
class Prepared:
    """What the worker runs for one request: prompt ids in a slot, and what to store after."""

    ids: list[int]
    slot: Slot
    session: str | None = None
    new_messages: list[dict[str, str]] = field(default_factory=list)
    dropped_messages: int = 0  # old history left out of the prompt to fit the context


class Conversations:
    """Builds prompts (history + system prompt) and hands out Slots; worker thread only."""

    def __init__(
        self,
        engine: Engine,
        db: StateDB | None = None,
        system_prompt: str = "",
        max_live: int = 4,
    ) -> None:
        self.engine = engine
        self.db = db
        self.system_prompt = system_prompt
        self.max_live = max(0, max_live)
        self._live: OrderedDict[str, Slot] = OrderedDict()
        self._memory: dict[str, list[dict[str, str]]] = {}  # history when there is no db
        self._system_slot: Slot | None = None

    def history(self, session: str) -> list[dict[str, str]]:
        if self.db is not None:
            return self.db.history(session)
        return list(self._memory.get(session, []))

    def prepare(self, request: Request, max_tokens: int) -> Prepared:
        """Prompt ids and Slot for `request`; raises RequestError / ContextLengthError."""
        if request.prompt is not None:  # raw completion: no template, no system prompt
            if request.session is not None:
                raise RequestError("a session turn takes messages (the new ones), not a raw prompt")
            ids = self.engine.encode_request(prompt=request.prompt)
            self.engine.check_length(len(ids), max_tokens)
            return Prepared(ids, Slot())
        new = [dict(m) for m in request.messages or ()]
        if not new:
            raise RequestError("give exactly one of prompt or messages (non-empty)")
        past = self.history(request.session) if request.session is not None else []
        if not past and self.system_prompt and new[0]["role"] != "system":
            new.insert(0, {"role": "system", "content": self.system_prompt})
        messages, ids, dropped = self._fit(past + new, len(new), max_tokens)
        self.engine.check_length(len(ids), max_tokens)
        slot = self._slot_for(request.session, messages)
        return Prepared(ids, slot, request.session, new, dropped)

    def commit(self, prepared: Prepared, answer: str) -> None:
        """Store a finished turn (its new messages and the answer) and keep its Slot live."""
        if prepared.session is None:
            return
        turn = [*prepared.new_messages, {"role": "assistant", "content": answer}]
        if self.db is not None:
            self.db.append(prepared.session, turn)
        else:
            self._memory.setdefault(prepared.session, []).extend(turn)
        self._keep(prepared.session, prepared.slot)

    def _fit(
        self, messages: list[dict[str, str]], keep_last: int, max_tokens: int
    ) -> tuple[list[dict[str, str]], list[int], int]:
        """Leave out the oldest turns (never system messages, never this turn) until it fits.

        The stored history is untouched; only the prompt slides. If even this turn alone is too
        long, the caller's check_length reports too_long.
        """
        dropped = 0
        while True:
            ids = self.engine.encode_request(messages=messages)
            if len(ids) + max_tokens <= self.engine.max_context:
                return messages, ids, dropped
            head = [i for i, m in enumerate(messages[: len(messages) - keep_last]) if m["role"] != "system"]
            if not head:
                return messages, ids, dropped
            # Drop one whole turn: the first non-system message and everything up to the next user
            # message, so the prompt never starts with an orphan assistant reply.
            start = head[0]
            end = start + 1
            limit = len(messages) - keep_last
            while end < limit and messages[end]["role"] != "user":
                end += 1
            messages = messages[:start] + messages[end:]
            dropped += end - start

    def _slot_for(self, session: str | None, messages: list[dict[str, str]]) -> Slot:
        if session is not None and session in self._live:
            self._live.move_to_end(session)
            return self._live[session]
        template = self._system_template(messages)
        if session is not None and self.max_live and len(self._live) >= self.max_live:
            # Evict now rather than after the turn, and give this session the evicted KV buffers:
            # a memory budget counts max_live session caches, and evicting after the turn held one
            # more for a moment (RSS peaks ~20 MB higher at such turns in the 400 MB soak).
            evicted, old = self._live.popitem(last=False)
            log.debug("session %s: KV slot evicted for %s (history stays in the database)", evicted, session)
            cache, old.cache, old.ids = old.cache, None, []  # a turn of `evicted` in flight re-allocates
            return self.engine.recycle(cache, template)
        return self.engine.fork_slot(template) if template is not None else Slot()

    def _system_template(self, messages: list[dict[str, str]]) -> Slot | None:
        """The Slot holding just the configured system prompt, if this prompt starts with it."""
        if not self.system_prompt or messages[0] != {"role": "system", "content": self.system_prompt}:
            return None
        if self._system_slot is None:
            tok = self.engine.tokenizer
            text = tok.render_chat([messages[0]], add_generation_prompt=False)
            ids = tok.encode(text)
            if len(ids) < 2:
                return None
            slot = Slot()
            self.engine.prefill(ids, slot)
            # prefill keeps logits for the last token only by running it; the KV for every token
            # of the system prompt is now in slot.cache and slot.ids == ids.
            self._system_slot = slot
            log.info("system prompt prefilled once (%d tokens)", len(ids))
        return self._system_slot

    def _keep(self, session: str, slot: Slot) -> None:
        if self.max_live == 0:
            return
        self._live[session] = slot
        self._live.move_to_end(session)
        while len(self._live) > self.max_live:
            evicted, _ = self._live.popitem(last=False)
            log.debug("session %s: KV slot evicted (history stays in the database)", evicted)
