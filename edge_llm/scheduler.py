"""The scheduler: one worker thread owns the engine; transports submit requests to it.

In: validated `Request`s from any thread, each with a `sink` (a callable the transport gives).
Out: `Event`s passed to the sink — stream chunks (when the request asked to stream), then
exactly one final (`final` with text and usage, or `error` with a protocol code). Events are
values; `protocol.reply` turns them into wire JSON (the transports' job, never this module's).

Semantics that do not depend on how the engine is driven:
- `submit` never blocks: a full queue or a client over its in-flight limit raises BusyError at
  once (nothing queued). Sampling parameters are checked there too (RequestError).
- Request ids are deduplicated: a repeat of a queued or running id joins it (a new reply
  address gets the remaining events; the same address is ignored), and a repeat of a finished id
  gets its stored final again without generating (`replayed=True`). Finals are kept in a bounded
  store (SQLite when the server gives one, so a restart still deduplicates); `busy` and
  `internal` errors are not stored, so a retry with the same id runs.
- A request belongs to the `identity` that submitted it (a string the transport gives: the
  socket peer's uid, the MQTT user or reply topic, an API key). Joining, replaying and
  cancelling work only for that identity; the same id from another one is refused (RequestError,
  "id in use"), so nobody receives or cancels someone else's request by guessing its id.
- `cancel(id)` and `deadline_ms` stop a request queued or running: it ends with an error event
  (`cancelled` / `deadline`), streamed chunks notwithstanding.
- Sinks are called on the worker thread (a replayed final: on the submitting thread), outside any
  lock; a sink that raises is logged and ignored. Sinks must not block for long.

Driving the engine: one loop (`_worker`) over up to `max_batch` rows. A request that arrives is
prefilled into a free row and joins the running ones at the next decode step; one that finishes
leaves. With an engine that can batch (a fused, shared-KV bundle) and `max_batch` > 1 the rows
are rows of one batch KV cache and a step is one forward for all of them; otherwise there is one
row, the request runs in its own slot (prompt-lookup speculation applies there), and the same
loop is plain one-at-a-time generation.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from edge_llm import constrain, protocol
from edge_llm.engine import Chunk, Engine, Generation
from edge_llm.errors import BusyError, ContextLengthError, EdgeLLMError, RequestError, SwapSupersededError
from edge_llm.protocol import Event, Request
from edge_llm.runner import SharedCache
from edge_llm.sampling import SamplingParams
from edge_llm.sessions import Conversations, FinalStore, MemoryFinals, Prepared

log = logging.getLogger(__name__)

# While requests run, queued ones are checked for deadlines and cancellation this often.
_SWEEP_S = 0.05
_BEAT_S = 0.25  # an idle worker still wakes this often to show it is alive (the service watchdog)

Sink = Callable[[Event], None]


class Ticket:
    """A handle on a submitted request: wait for its final event, or cancel it."""

    def __init__(self, request_id: str, scheduler: Scheduler | None = None, identity: str = "") -> None:
        self.id = request_id
        self.identity = identity
        self._scheduler = scheduler
        self._done = threading.Event()
        self._final: Event | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def final(self) -> Event | None:
        return self._final

    def wait(self, timeout: float | None = None) -> Event | None:
        """The final event, or None if `timeout` passed first."""
        self._done.wait(timeout)
        return self._final

    def cancel(self) -> bool:
        if self._scheduler is None or self.done:
            return False
        return self._scheduler.cancel(self.id, self.identity)

    def _resolve(self, event: Event) -> None:
        self._final = event
        self._done.set()


@dataclass(eq=False)
class _Listener:
    sink: Sink
    key: str | None


@dataclass(eq=False)
class _Job:
    request: Request
    params: SamplingParams
    client: str
    identity: str
    listeners: list[_Listener]
    ticket: Ticket
    submitted: float
    deadline: float | None
    cancelled: bool = False
    started: float = 0.0
    seq: int = 0


@dataclass(eq=False)
class _Running:
    """A request in a row: its job, its prompt and slot, and the engine's generation state."""

    job: _Job
    prepared: Prepared
    gen: Generation


class _SwapDone(threading.Event):
    """Set once the worker took the swap, or once a newer swap replaced it (`superseded`)."""

    superseded = False


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_queue: int = 16,
        max_inflight_per_client: int = 4,
        *,
        conversations: Conversations | None = None,
        finals: FinalStore | None = None,
        default_max_tokens: int = 256,
        max_batch: int | None = None,
    ) -> None:
        if max_queue < 1 or max_inflight_per_client < 1:
            raise ValueError("max_queue and max_inflight_per_client must be ≥ 1")
        self.engine = engine
        self.max_queue = max_queue
        self.max_inflight_per_client = max_inflight_per_client
        self.default_max_tokens = default_max_tokens
        self._rows = max_batch
        self.max_batch = self._batch_rows(engine)  # rows of the one worker loop
        self.conversations = conversations or Conversations(engine)
        self.finals: FinalStore = finals if finals is not None else MemoryFinals()
        self.stats: Counter[str] = Counter()  # runs, replayed, joined, busy, cancelled, deadline, ...
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}  # queued and running, by request id
        self._per_client: Counter[str] = Counter()
        self._closing = False
        self._abort_at = float("inf")  # after close(): when running requests are interrupted
        self._last_sweep = 0.0
        self._beat = time.monotonic()  # the worker's last sign of life: `alive()`
        self._swap: tuple[Engine, Conversations, _SwapDone] | None = None
        self._swapped = threading.Event()  # the last swap's: set once the worker took it
        self._swapped.set()
        self._thread: threading.Thread | None = None
        # Read by metrics from other threads (plain reads of values the worker replaces whole).
        self.active_rows = 0
        self.live_rows: frozenset[int] = frozenset()  # rows of batch_cache running a request
        self.batch_cache: SharedCache | None = None
        # Called on the worker with the number of rows of each decode step (metrics: batch
        # occupancy). The scheduler's one observation hook: it stays free of metrics code.
        self.on_step: Callable[[int], None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests queued or running."""
        return len(self._jobs)

    # -- public API (any thread) --

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="edge-llm-worker", daemon=True)
            self._thread.start()

    def submit(
        self,
        request: Request,
        sink: Sink,
        client: str = "",
        reply_key: str | None = None,
        identity: str = "",
    ) -> Ticket:
        """Queue `request`; raise BusyError (queue full, client over its limit, closing) or
        RequestError (bad sampling parameters; its id in use by another identity). `client`
        groups requests for the in-flight limit; `reply_key` names the reply address so a
        redelivery to it is not answered twice; `identity` owns the request (see above)."""
        params = self._params(request)
        with self._cond:
            job = self._jobs.get(request.id)
            if job is not None:
                self._check_owner(request.id, job.identity, identity)
                if reply_key is None or all(lst.key != reply_key for lst in job.listeners):
                    job.listeners.append(_Listener(sink, reply_key))
                self.stats["joined"] += 1
                return job.ticket
            # Looked up under the lock: a job stores its final before leaving _jobs, so a
            # request id is always either in _jobs or in the store once it has run.
            stored = self.finals.get_final(request.id)
            if stored is None:
                return self._enqueue_locked(request, params, sink, client, reply_key, identity)
            self._check_owner(request.id, stored[0], identity)
            self.stats["replayed"] += 1
        replay = dataclasses.replace(stored[1], replayed=True)
        ticket = Ticket(request.id)
        _call(sink, replay)
        ticket._resolve(replay)
        return ticket

    def cancel(self, request_id: str, identity: str = "") -> bool:
        """Cancel a queued or running request of `identity`; False if it has none in flight
        by that id (another identity's request is left alone)."""
        with self._cond:
            job = self._jobs.get(request_id)
            if job is None:
                return False
            if job.identity != identity:
                self.stats["cancel_refused"] += 1
                return False
            job.cancelled = True
            self._cond.notify_all()  # the worker ends a queued job at once, a running one next token
        return True

    def accepting(self) -> bool:
        """Ready for requests: the worker runs and close() has not begun (HTTP /readyz)."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def _batch_rows(self, engine: Engine) -> int:
        rows = engine.options.max_batch if self._rows is None else self._rows
        return max(1, rows) if engine.can_batch else 1

    def swap_engine(self, engine: Engine, conversations: Conversations, timeout: float | None = None) -> bool:
        """Serve with `engine` (a new bundle) from now on. Requests already running finish on the
        old engine; queued and new ones wait for them, then run on the new one: none is refused
        or lost. Returns once the worker has switched (False if `timeout` passed first)."""
        done = _SwapDone()
        with self._cond:
            if self._thread is None:  # not serving yet: nothing to drain
                self.engine, self.conversations = engine, conversations
                self.max_batch = self._batch_rows(engine)
                return True
            if self._swap is not None:
                # A swap still waiting for the old engine's rows (a reload meeting an OTA switch):
                # the newer one replaces it, and its waiter is told so instead of waiting forever.
                self._swap[2].superseded = True
                self._swap[2].set()
            self._swap = (engine, conversations, done)
            self._swapped = done
            self._cond.notify_all()
        finished = done.wait(timeout)
        if done.superseded:
            raise SwapSupersededError("engine swap replaced by a newer one before it happened")
        return finished

    def wait_swap(self, timeout: float | None = None) -> bool:
        """Whether the last `swap_engine` has happened, waiting up to `timeout` for it (a swap
        that timed out still happens once the old engine's running requests finish)."""
        return self._swapped.wait(timeout)

    def alive(self, within_s: float) -> bool:
        """Whether the worker thread runs and has come round its loop within `within_s`: False
        once a forward or a sink has been stuck that long (what the systemd watchdog reports)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and time.monotonic() - self._beat < within_s

    def close(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, answer queued ones `busy`, give running ones `grace_s`."""
        with self._cond:
            self._closing = True
            self._abort_at = time.monotonic() + grace_s
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            self._finish(job, _error(job, "busy", "the server is shutting down; retry later"))
        if self._thread is not None:
            self._thread.join(grace_s + 5.0)

    def _check_owner(self, request_id: str, owner: str, identity: str) -> None:
        if owner != identity:
            self.stats["id_in_use"] += 1
            raise RequestError(f"id in use: request {request_id!r} belongs to another client; use a new id")

    def _enqueue_locked(
        self,
        request: Request,
        params: SamplingParams,
        sink: Sink,
        client: str,
        reply_key: str | None,
        identity: str,
    ) -> Ticket:
        if self._closing:
            raise BusyError("the server is shutting down; retry later")
        if len(self._queue) >= self.max_queue:
            self.stats["busy"] += 1
            raise BusyError(f"the queue is full ({self.max_queue} waiting); retry later")
        if self._per_client[client] >= self.max_inflight_per_client:
            self.stats["busy"] += 1
            raise BusyError(f"this client already has {self.max_inflight_per_client} requests in flight")
        now = time.monotonic()
        deadline = now + request.deadline_ms / 1000 if request.deadline_ms is not None else None
        listeners = [_Listener(sink, reply_key)]
        ticket = Ticket(request.id, self, identity)
        job = _Job(request, params, client, identity, listeners, ticket, now, deadline)
        self._jobs[request.id] = job
        self._per_client[client] += 1
        self._queue.append(job)
        self.stats["submitted"] += 1
        self._cond.notify_all()
        return job.ticket

    # -- the worker loop --

    def _worker(self) -> None:
        """Admit queued requests into free rows, advance every row one step, repeat."""
        cache = self.engine.batch_cache(self.max_batch) if self.max_batch > 1 else None
        self.batch_cache = cache
        rows: dict[int, _Running] = {}
        while True:
            self._beat = time.monotonic()
            if self._swap is not None and not rows:  # the old engine's rows have drained
                cache = self.batch_cache = self._apply_swap()
            self._publish_rows(rows)
            self._admit(rows, cache)  # blocks for work only while no row is busy
            self._publish_rows(rows)
            if not rows:
                if self._closing:
                    return
                continue
            self._sweep_queue()
            self._step(rows)

    def _publish_rows(self, rows: dict[int, _Running]) -> None:
        self.live_rows = frozenset(rows)
        self.active_rows = len(rows)

    def _admit(self, rows: dict[int, _Running], cache: SharedCache | None) -> None:
        """Fill free rows from the queue and prefill the newcomers (adjacent ones in one forward)."""
        new: dict[int, _Running] = {}
        if self._swap is not None:  # an engine swap waits for the running rows: admit nobody
            return
        for row in [r for r in range(self.max_batch) if r not in rows]:
            job = self._next_job(block=not rows and not new)
            if job is None:
                break
            try:
                new[row] = self._begin(job, cache, row)
            except Exception as exc:
                self._fail([job], exc)
        if not new:
            return
        try:  # beside running rows, the ragged graph folds their prompts into the next step
            self.engine.start_all([r.gen for r in new.values()], fold=bool(rows))
        except Exception:  # a shared prefill failed: run each alone so only its culprit fails
            log.warning("batched prefill failed; prefilling its requests one by one", exc_info=True)
            for row, r in list(new.items()):
                if r.gen.last >= 0 or r.gen.finished:
                    continue
                try:
                    self.engine.start_all([r.gen])
                except Exception as exc:
                    self._fail([r.job], exc)
                    del new[row]
        for row, r in new.items():
            if not self._advance(r):
                rows[row] = r

    def _begin(self, job: _Job, cache: SharedCache | None, row: int) -> _Running:
        """Prompt ids and slot for `job`, placed in batch row `row` (or in its own slot)."""
        constraint = self.engine.constraint(job.request.response_format)  # a bad schema: bad_request
        prepared = self._prepare(job)
        self.stats["runs"] += 1
        slot = prepared.slot if cache is None else self.engine.attach(prepared.slot, cache, row)
        return _Running(job, prepared, Generation(self.engine, prepared.ids, job.params, slot, constraint))

    def _step(self, rows: dict[int, _Running]) -> None:
        """One decode step for every row; emit what each produced; retire the finished."""
        self.stats["batch_steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(rows))
        if self.on_step is not None:
            try:
                self.on_step(len(rows))
            except Exception:  # an observer's bug must not stop generation
                log.exception("the step observer failed")
        try:
            self.engine.step([r.gen for r in rows.values()])
        except Exception as exc:  # one failed forward fails every row in it, never the worker
            self._fail([r.job for r in rows.values()], exc)
            rows.clear()
            return
        for row in [row for row, r in rows.items() if self._advance(r)]:
            del rows[row]

    def _advance(self, r: _Running) -> bool:
        """Emit what a sequence produced in the last step; finish it when done. True if done."""
        if not r.gen.finished and self._expired(r.job) is not None:
            r.gen.cancel()
        self._chunk(r.job, r.gen.pop_delta())
        if not r.gen.finished:
            return False
        if r.gen.error is not None:  # its constraint failed: this request ends, the batch goes on
            self._fail([r.job], r.gen.error)
            return True
        event = self._final(r.job, r.gen.final())
        if event.kind == "final":
            try:
                self._keep(r, event.text)
            except Exception as exc:  # e.g. the database: the request fails, the worker goes on
                self._fail([r.job], exc)
                return True
        self._finish(r.job, event)
        return True

    def _keep(self, r: _Running, answer: str) -> None:
        """Store a finished turn; a session's KV leaves its batch row for the next turn to reuse."""
        if r.gen.slot is not r.prepared.slot and r.prepared.session is not None:
            self.engine.detach(r.gen.slot, r.prepared.slot)
        self.conversations.commit(r.prepared, answer)

    def _apply_swap(self) -> SharedCache | None:
        """Worker thread, no rows running: take the new engine and its conversations."""
        with self._cond:
            assert self._swap is not None
            engine, conversations, done = self._swap
            self._swap = None
        self.engine, self.conversations = engine, conversations
        self.max_batch = self._batch_rows(engine)
        self.stats["engine_swaps"] += 1
        done.set()
        return engine.batch_cache(self.max_batch) if self.max_batch > 1 else None

    def _next_job(self, block: bool) -> _Job | None:
        """The next queued job that is still wanted (None: nothing queued, or closing)."""
        while True:
            with self._cond:
                while block and not self._queue and not self._closing and self._swap is None:
                    self._cond.wait(_BEAT_S)
                    self._beat = time.monotonic()
                ended = self._take_expired_locked()
                job = self._queue.popleft() if self._queue and not ended else None
                if job is not None:
                    job.started = time.monotonic()
            for j, event in ended:
                self._finish(j, event)
            if job is not None or not ended:
                return job

    def _sweep_queue(self) -> None:
        """End queued jobs that were cancelled or ran out of time while others run."""
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_S:
            return
        self._last_sweep = now
        with self._cond:
            ended = self._take_expired_locked()
        for job, event in ended:
            self._finish(job, event)

    def _take_expired_locked(self) -> list[tuple[_Job, Event]]:
        ended = [(j, e) for j in self._queue if (e := self._expired(j, queued=True)) is not None]
        if ended:
            gone = {id(j) for j, _ in ended}
            self._queue = deque(j for j in self._queue if id(j) not in gone)
        return ended

    def _expired(self, job: _Job, queued: bool = False) -> Event | None:
        """The error that ends `job` now — cancelled, past its deadline, or (running) past the
        shutdown grace — or None while it may go on. The one place these rules live."""
        now = time.monotonic()
        if job.cancelled:
            when = "before it started" if queued else "by the client"
            return _error(job, "cancelled", f"cancelled {when}")
        if job.deadline is not None and now >= job.deadline:
            if queued:
                return _error(job, "deadline", "the deadline passed while queued")
            return _error(job, "deadline", f"the deadline ({job.request.deadline_ms} ms) passed")
        if not queued and self._closing and now >= self._abort_at:
            return _error(job, "busy", "the server is shutting down; retry later")
        return None

    # -- per-request helpers --

    def _prepare(self, job: _Job) -> Prepared:
        """Prompt ids and slot. Without an explicit max_tokens a request gets as many tokens as
        fit in the context, up to the default (docs/protocol.md): a long prompt is refused only
        when not even one token fits. A session first tries to keep room for the default (old
        turns leave the prompt for it), then settles for what is left after this turn."""
        if job.request.max_tokens is not None:
            return self.conversations.prepare(job.request, job.params.max_tokens)
        context = self.engine.max_context
        hoped = max(1, min(job.params.max_tokens, context // 2))
        try:
            prepared = self.conversations.prepare(job.request, hoped)
        except ContextLengthError:
            prepared = self.conversations.prepare(job.request, 1)
        room = max(1, min(job.params.max_tokens, context - len(prepared.ids)))
        job.params = dataclasses.replace(job.params, max_tokens=room)
        return prepared

    def _chunk(self, job: _Job, delta: str) -> None:
        if job.request.stream and delta:
            self._emit(job, Event("chunk", job.request.id, seq=job.seq, delta=delta))
            job.seq += 1

    def _final(self, job: _Job, chunk: Chunk) -> Event:
        if chunk.finish_reason == "cancelled":  # only _advance cancels, for an expiry reason
            return self._expired(job) or _error(job, "cancelled", "cancelled by the client")
        usage = chunk.usage.as_dict() if chunk.usage is not None else {}
        usage["queue_s"] = round(job.started - job.submitted, 6)
        return Event(
            "final",
            job.request.id,
            text=chunk.text,
            finish_reason=chunk.finish_reason or "stop",
            usage=usage,
            session=job.request.session,
        )

    def _fail(self, jobs: list[_Job], exc: Exception) -> None:
        """Finish `jobs` with the error for `exc`: its own protocol code, else internal."""
        if isinstance(exc, EdgeLLMError):
            code, message = protocol.error_code(exc), str(exc)
        else:
            log.error("request(s) %s failed", ", ".join(j.request.id for j in jobs), exc_info=exc)
            code, message = "internal", f"{type(exc).__name__}: {exc}"
        for job in jobs:
            self._finish(job, _error(job, code, message))

    def _params(self, request: Request) -> SamplingParams:
        if request.response_format is not None:
            constrain.require()  # a missing extra is refused at once, naming it
        try:
            return SamplingParams(
                max_tokens=request.max_tokens or self.default_max_tokens,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                repetition_penalty=request.repetition_penalty,
                seed=request.seed,
                stop=request.stop,
                ignore_eos=request.ignore_eos,
            )
        except RequestError:
            raise
        except (TypeError, ValueError) as exc:
            raise RequestError(str(exc)) from None

    def _emit(self, job: _Job, event: Event) -> None:
        with self._cond:
            listeners = list(job.listeners)
        for listener in listeners:
            _call(listener.sink, event)

    def _finish(self, job: _Job, event: Event) -> None:
        if event.kind == "final" or event.code not in ("busy", "internal"):
            try:
                self.finals.put_final(job.request.id, job.identity, event)
            except Exception:  # a full disk must not stop the reply from going out
                log.exception("could not store the final reply of %s", job.request.id)
        self.stats[event.code or "completed"] += 1
        with self._cond:
            self._jobs.pop(job.request.id, None)
            self._per_client[job.client] -= 1
            if self._per_client[job.client] <= 0:
                del self._per_client[job.client]
            listeners = list(job.listeners)
        for listener in listeners:
            _call(listener.sink, event)
        job.ticket._resolve(event)


def _error(job: _Job, code: str, message: str) -> Event:
    return Event("error", job.request.id, code=code, message=message)


def _call(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except Exception:
        log.exception("a reply sink failed for %s", event.id)


__all__ = ["Event", "FinalStore", "MemoryFinals", "Scheduler", "Sink", "Ticket"]
