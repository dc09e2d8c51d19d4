"""The scheduler: one worker thread owns the engine; transports submit requests to it.

In: validated `Request`s from any thread, each with a `sink` (a callable the transport gives).
Out: `Event`s passed to the sink — stream chunks (when the request asked to stream), then
exactly one final (`final` with text and usage, or `error` with a protocol code).

Semantics that do not depend on how the engine is driven:
- `submit` never blocks: a full queue or a client over its in-flight limit raises BusyError at
  once (nothing queued). Sampling parameters are checked there too (RequestError).
- Request ids are deduplicated: a repeat of a queued or running id joins it (a new reply
  address gets the remaining events; the same address is ignored), and a repeat of a finished id
  gets its stored final again without generating (`replayed=True`). Finals are kept in a bounded
  store (SQLite when the server gives one, so a restart still deduplicates); `busy` and
  `internal` errors are not stored, so a retry with the same id runs.
- `cancel(id)` and `deadline_ms` stop a request queued or running: it ends with an error event
  (`cancelled` / `deadline`), streamed chunks notwithstanding.
- Sinks are called on the worker thread (a replayed final: on the submitting thread), outside any
  lock; a sink that raises is logged and ignored. Sinks must not block for long.

Driving the engine: with a fused (shared-KV) bundle and `max_batch` > 1 the worker batches
continuously — a request that arrives is prefilled into a free row of one batch KV cache and joins
the running batch at the next decode step; one that finishes leaves it; every sequence keeps its
own sampling parameters. Otherwise requests run one at a time (`_run_one`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from edge_llm import protocol
from edge_llm.engine import Chunk, Engine, Generation
from edge_llm.errors import BusyError, EdgeLLMError, RequestError
from edge_llm.protocol import Request
from edge_llm.runner import SharedCache, SharedRunner
from edge_llm.sampling import SamplingParams
from edge_llm.sessions import Conversations, Prepared

log = logging.getLogger(__name__)

# While a request runs, queued requests are checked for deadlines and cancellation this often.
_SWEEP_S = 0.05


@dataclass(frozen=True)
class Event:
    kind: Literal["chunk", "final", "error"]
    id: str
    seq: int = 0
    delta: str = ""
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, Any] | None = None
    session: str | None = None
    code: str = ""
    message: str = ""
    replayed: bool = False

    @property
    def done(self) -> bool:
        return self.kind != "chunk"

    def to_reply(self) -> dict[str, Any]:
        """The protocol reply object for this event."""
        if self.kind == "chunk":
            return protocol.chunk_reply(self.id, self.seq, self.delta)
        if self.kind == "final":
            return protocol.final_reply(
                self.id, self.text, self.finish_reason, self.usage or {}, self.session
            )
        return protocol.error_reply(self.id, self.code, self.message)

    @classmethod
    def from_reply(cls, reply: dict[str, Any], replayed: bool = False) -> Event:
        if "error" in reply:
            err = reply["error"]
            return cls("error", reply["id"], code=err["code"], message=err["message"], replayed=replayed)
        return cls(
            "final",
            reply["id"],
            text=reply["text"],
            finish_reason=reply["finish_reason"],
            usage=reply.get("usage"),
            session=reply.get("session"),
            replayed=replayed,
        )


Sink = Callable[[Event], None]


class FinalStore(Protocol):
    def get_final(self, request_id: str) -> dict[str, Any] | None: ...
    def put_final(self, request_id: str, reply: dict[str, Any]) -> None: ...


class MemoryFinals:
    """Bounded in-memory final store (the default when no database is given)."""

    def __init__(self, max_finals: int = 1000) -> None:
        self.max_finals = max_finals
        self._finals: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get_final(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._finals.get(request_id)

    def put_final(self, request_id: str, reply: dict[str, Any]) -> None:
        with self._lock:
            self._finals[request_id] = reply
            self._finals.move_to_end(request_id)
            while len(self._finals) > self.max_finals:
                self._finals.popitem(last=False)


class Ticket:
    """A handle on a submitted request: wait for its final event, or cancel it."""

    def __init__(self, request_id: str, scheduler: Scheduler | None = None) -> None:
        self.id = request_id
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
        return self._scheduler.cancel(self.id) if self._scheduler is not None and not self.done else False

    def _resolve(self, event: Event) -> None:
        self._final = event
        self._done.set()


@dataclass(eq=False)
class _Listener:
    sink: Sink
    key: str | None


@dataclass(eq=False)
class _Running:
    job: _Job
    prepared: Prepared
    gen: Generation


@dataclass(eq=False)
class _Job:
    request: Request
    params: SamplingParams
    client: str
    listeners: list[_Listener]
    ticket: Ticket
    submitted: float
    deadline: float | None
    cancelled: bool = False
    started: float = 0.0
    seq: int = 0


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
        rows = engine.options.max_batch if max_batch is None else max_batch
        self.max_batch = rows if rows > 1 and isinstance(engine.runner, SharedRunner) else 1
        self.conversations = conversations or Conversations(engine)
        self.finals: FinalStore = finals if finals is not None else MemoryFinals()
        self.stats: Counter[str] = Counter()  # runs, replayed, joined, busy, cancelled, deadline, ...
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}  # queued and running, by request id
        self._per_client: Counter[str] = Counter()
        self._closing = False
        self._abort_at = float("inf")  # after close(): when the running request is interrupted
        self._last_sweep = 0.0
        self._thread: threading.Thread | None = None

    # -- public API (any thread) --

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="edge-llm-worker", daemon=True)
            self._thread.start()

    def submit(self, request: Request, sink: Sink, client: str = "", reply_key: str | None = None) -> Ticket:
        """Queue `request`; raise BusyError (queue full, client over its limit, closing) or
        RequestError (bad sampling parameters). `client` groups requests for the in-flight
        limit; `reply_key` names the reply address so a redelivery to it is not answered twice."""
        params = self._params(request)
        replay: Event | None = None
        with self._cond:
            job = self._jobs.get(request.id)
            if job is not None:
                if reply_key is None or all(lst.key != reply_key for lst in job.listeners):
                    job.listeners.append(_Listener(sink, reply_key))
                self.stats["joined"] += 1
                return job.ticket
            # Looked up under the lock: a job stores its final before leaving _jobs, so a
            # request id is always either in _jobs or in the store once it has run.
            stored = self.finals.get_final(request.id)
            if stored is not None:
                replay = Event.from_reply(stored, replayed=True)
                self.stats["replayed"] += 1
            else:
                if self._closing:
                    raise BusyError("the server is shutting down; retry later")
                if len(self._queue) >= self.max_queue:
                    self.stats["busy"] += 1
                    raise BusyError(f"the queue is full ({self.max_queue} waiting); retry later")
                if self._per_client[client] >= self.max_inflight_per_client:
                    self.stats["busy"] += 1
                    raise BusyError(
                        f"this client already has {self.max_inflight_per_client} requests in flight"
                    )
                now = time.monotonic()
                deadline = now + request.deadline_ms / 1000 if request.deadline_ms is not None else None
                job = _Job(
                    request,
                    params,
                    client,
                    [_Listener(sink, reply_key)],
                    Ticket(request.id, self),
                    now,
                    deadline,
                )
                self._jobs[request.id] = job
                self._per_client[client] += 1
                self._queue.append(job)
                self.stats["submitted"] += 1
                self._cond.notify_all()
                return job.ticket
        ticket = Ticket(request.id)
        _call(sink, replay)
        ticket._resolve(replay)
        return ticket

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if it is not in flight."""
        with self._cond:
            job = self._jobs.get(request_id)
            if job is None:
                return False
            job.cancelled = True
            self._cond.notify_all()  # the worker ends a queued job at once, a running one next token
        return True

    def accepting(self) -> bool:
        """Ready for requests: the worker runs and close() has not begun (HTTP /readyz)."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, answer queued ones `busy`, give the running one `grace_s`."""
        with self._cond:
            self._closing = True
            self._abort_at = time.monotonic() + grace_s
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            self._finish(job, self._error(job, "busy", "the server is shutting down; retry later"))
        if self._thread is not None:
            self._thread.join(grace_s + 5.0)

    # -- worker thread --

    def _worker(self) -> None:
        if self.max_batch > 1:
            self._worker_batched()
            return
        while True:
            job = self._next_job()
            if job is None:
                return
            self._execute(job)

    def _next_job(self, block: bool = True) -> _Job | None:
        while True:
            with self._cond:
                # Queued jobs only wait while another one runs; `_should_stop` sweeps them then.
                while block and not self._queue and not self._closing:
                    self._cond.wait()
                if (self._closing or not block) and not self._queue:
                    return None
                ended = self._take_expired_locked()
                job = None
                if not ended and self._queue:
                    job = self._queue.popleft()
                    job.started = time.monotonic()
            for j, event in ended:
                self._finish(j, event)
            if job is not None:
                return job

    def _take_expired_locked(self) -> list[tuple[_Job, Event]]:
        """Remove queued jobs that were cancelled or ran out of time; return their error events."""
        now = time.monotonic()
        ended: list[tuple[_Job, Event]] = []
        kept: deque[_Job] = deque()
        for j in self._queue:
            if j.cancelled:
                ended.append((j, self._error(j, "cancelled", "cancelled before it started")))
            elif j.deadline is not None and now >= j.deadline:
                ended.append((j, self._error(j, "deadline", "the deadline passed while queued")))
            else:
                kept.append(j)
        self._queue = kept
        return ended

    def _execute(self, job: _Job) -> None:
        try:
            if job.cancelled:
                event = self._error(job, "cancelled", "cancelled before it started")
            elif job.deadline is not None and time.monotonic() >= job.deadline:
                event = self._error(job, "deadline", "the deadline passed while queued")
            else:
                prepared = self._prepare(job)
                self.stats["runs"] += 1
                event = self._run_one(job, prepared)
                if event.kind == "final":
                    self.conversations.commit(prepared, event.text)
        except EdgeLLMError as exc:
            event = self._error(job, protocol.error_code(exc), str(exc))
        except Exception as exc:  # never let one request kill the worker
            log.exception("request %s failed", job.request.id)
            event = self._error(job, "internal", f"{type(exc).__name__}: {exc}")
        self._finish(job, event)

    def _prepare(self, job: _Job) -> Prepared:
        """Prompt ids and slot. Without an explicit max_tokens a request gets as many as fit in
        the context, up to the default, rather than a too_long error for a long prompt."""
        if job.request.max_tokens is not None:
            return self.conversations.prepare(job.request, job.params.max_tokens)
        context = self.engine.max_context
        prepared = self.conversations.prepare(job.request, max(1, min(job.params.max_tokens, context // 2)))
        room = max(1, min(job.params.max_tokens, context - len(prepared.ids)))
        job.params = dataclasses.replace(job.params, max_tokens=room)
        return prepared

    def _run_one(self, job: _Job, prepared: Prepared) -> Event:
        """Drive the engine for one request; emit chunks; return its final or error event."""
        for chunk in self.engine.generate(
            prepared.ids, job.params, slot=prepared.slot, should_stop=lambda: self._should_stop(job)
        ):
            if not chunk.done:
                self._chunk(job, chunk.delta)
                continue
            return self._final(job, chunk)
        raise RuntimeError("the engine ended without a final chunk")

    def _chunk(self, job: _Job, delta: str) -> None:
        if job.request.stream and delta:
            self._emit(job, Event("chunk", job.request.id, seq=job.seq, delta=delta))
            job.seq += 1

    def _final(self, job: _Job, chunk: Chunk) -> Event:
        if chunk.finish_reason == "cancelled":
            return self._stopped(job)
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

    # -- continuous batching --

    def _worker_batched(self) -> None:
        cache = self.engine.batch_cache(self.max_batch)
        active: dict[int, _Running] = {}
        while True:
            free = sorted(set(range(self.max_batch)) - set(active))
            taken: list[tuple[int, _Job]] = []
            while len(taken) < len(free):  # admit: block for work only when idle
                job = self._next_job(block=not active and not taken)
                if job is None:
                    break
                taken.append((free[len(taken)], job))
            if taken:
                active.update(self._admit(taken, cache))
            if not active:
                if self._closing:
                    return
                continue
            self.stats["batch_steps"] += 1
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(active))
            try:
                self.engine.step([r.gen for r in active.values()])
            except Exception as exc:  # one failed forward fails the whole batch, not the worker
                log.exception("batched decode step failed")
                for row in list(active):
                    r = active.pop(row)
                    self._finish(r.job, self._error(r.job, "internal", f"{type(exc).__name__}: {exc}"))
                continue
            for row in list(active):
                if self._advance(active[row]):
                    del active[row]

    def _admit(self, taken: list[tuple[int, _Job]], cache: SharedCache) -> dict[int, _Running]:
        """Prefill requests into their batch rows (adjacent ones in one forward); returns those
        still running (the rest ended at once: error, cancelled, a single token)."""
        ready: dict[int, tuple[_Job, Prepared, Generation]] = {}
        for row, job in taken:
            if job.cancelled or (job.deadline is not None and time.monotonic() >= job.deadline):
                self._finish(job, self._stopped(job))
                continue

            def begin(job: _Job = job, row: int = row) -> tuple[_Job, Prepared, Generation]:
                prepared = self._prepare(job)
                self.stats["runs"] += 1
                slot = self.engine.attach(prepared.slot, cache, row)
                return job, prepared, Generation(self.engine, prepared.ids, job.params, slot)

            if (got := self._guarded(job, begin)) is not None:
                ready[row] = got
        try:
            self.engine.start_all([gen for _, _, gen in ready.values()])
        except Exception:  # a shared prefill failed: run each alone so only its culprit fails
            log.warning("batched prefill failed; prefilling its requests one by one", exc_info=True)
            for row, (job, _, gen) in list(ready.items()):
                if gen.last >= 0 or gen.finished:
                    continue

                def alone(gen: Generation = gen) -> Generation:
                    self.engine.start_all([gen])
                    return gen

                if self._guarded(job, alone) is None:
                    del ready[row]
        out: dict[int, _Running] = {}
        for row, (job, prepared, gen) in ready.items():
            running = _Running(job, prepared, gen)
            if not self._advance(running):
                out[row] = running
        return out

    def _guarded(self, job: _Job, fn: Callable[[], Any]) -> Any:
        """fn() or, when it raises, None after finishing `job` with the matching error event."""
        try:
            return fn()
        except EdgeLLMError as exc:
            self._finish(job, self._error(job, protocol.error_code(exc), str(exc)))
        except Exception as exc:
            log.exception("request %s failed", job.request.id)
            self._finish(job, self._error(job, "internal", f"{type(exc).__name__}: {exc}"))
        return None

    def _advance(self, r: _Running) -> bool:
        """Emit what a sequence produced in the last step; finish it when done. True if done."""
        if not r.gen.finished and self._should_stop(r.job):
            r.gen.cancel()
        self._chunk(r.job, r.gen.pop_delta())
        if not r.gen.finished:
            return False
        event = self._final(r.job, r.gen.final())
        if event.kind == "final":
            if r.prepared.session is not None:
                self.engine.detach(r.gen.slot, r.prepared.slot)
            self.conversations.commit(r.prepared, event.text)
        self._finish(r.job, event)
        return True

    def _should_stop(self, job: _Job) -> bool:
        now = time.monotonic()
        if now - self._last_sweep >= _SWEEP_S:  # queued requests expire even while one runs
            self._last_sweep = now
            with self._cond:
                ended = self._take_expired_locked()
            for j, event in ended:
                self._finish(j, event)
        return (
            job.cancelled
            or (job.deadline is not None and now >= job.deadline)
            or (self._closing and now >= self._abort_at)
        )

    def _stopped(self, job: _Job) -> Event:
        if job.cancelled:
            return self._error(job, "cancelled", "cancelled by the client")
        if job.deadline is not None and time.monotonic() >= job.deadline:
            return self._error(job, "deadline", f"the deadline ({job.request.deadline_ms} ms) passed")
        return self._error(job, "busy", "the server is shutting down; retry later")

    # -- helpers --

    def _params(self, request: Request) -> SamplingParams:
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

    def _error(self, job: _Job, code: str, message: str) -> Event:
        return Event("error", job.request.id, code=code, message=message)

    def _emit(self, job: _Job, event: Event) -> None:
        with self._cond:
            listeners = list(job.listeners)
        for listener in listeners:
            _call(listener.sink, event)

    def _finish(self, job: _Job, event: Event) -> None:
        if event.kind == "final" or event.code not in ("busy", "internal"):
            try:
                self.finals.put_final(job.request.id, event.to_reply())
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


def _call(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except Exception:
        log.exception("a reply sink failed for %s", event.id)


__all__ = ["Event", "FinalStore", "MemoryFinals", "Scheduler", "Sink", "Ticket"]
