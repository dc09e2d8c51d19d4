"""Service metrics: Prometheus text for scrapers, a compact JSON summary for the MQTT heartbeat.

In: every final reply the dispatcher sends (`finished(transport, event, elapsed_s)`: outcome,
and for a completed request the `usage` the scheduler put in it), one call per decode step with
the rows in use (`step(rows)`, the scheduler's only hook), and at scrape time the scheduler's
queue depth / in-flight count and the KV cache sizes. Out: `render()` — the Prometheus text
exposition of a private `CollectorRegistry` (one per server, so two servers in one process, as in
the tests, never share counters) — and `summary()` for the heartbeat.

prometheus-client (extra `metrics`) is imported only when a Prometheus view is asked for: the
heartbeat summary uses plain counters kept here, so a board without the extra still reports its
health over MQTT.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from edge_llm.errors import ConfigError, TransportError
from edge_llm.protocol import Event

if TYPE_CHECKING:
    from edge_llm.engine import Engine
    from edge_llm.scheduler import Scheduler

log = logging.getLogger(__name__)

INSTALL_HINT = "Prometheus metrics need the `metrics` extra: pip install 'edge-llm[metrics]'"

# Histogram buckets sized for a small board: a request takes from ~10 ms (tiny prompt, cached) to
# minutes (a long answer on a slow CPU); decode speed from ~1 to a few hundred tokens/s.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOK_S = (1.0, 2.0, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return prometheus_client


def cache_bytes(cache: Any, rows: Iterable[int] | None = None) -> tuple[int, int]:
    """(reserved, used) bytes of one KV cache of any layout. Preallocated buffers (shared,
    static layouts) reserve their full capacity — address space, committed page by page as
    written (`runner.lazy_zeros`) — and use the positions their rows hold (`rows`: only these
    rows count, e.g. the batch rows running a request); a concat cache's ORT values are exactly
    its positions (element size from the type name)."""
    if cache is None:
        return 0, 0
    buffers = getattr(cache, "buffers", None)
    if buffers is not None:
        reserved = sum(int(b.nbytes) for b in buffers)
        count, capacity = buffers[0].shape[0], buffers[0].shape[2]  # [rows, kv_heads, capacity, head_dim]
        lengths = cache.lengths if rows is None else [cache.lengths[r] for r in rows]
        used = reserved * int(sum(lengths)) // max(1, count * capacity)
        return reserved, used
    total = 0
    for value in getattr(cache, "past", ()):
        count = 1
        for dim in value.shape():
            count *= int(dim)
        total += count * _ORT_SIZES.get(value.data_type(), 4)
    return total, total


_ORT_SIZES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(int8)": 1}


class Metrics:
    """Counters for one server. Thread-safe: transports and the worker call it concurrently."""

    def __init__(self, scheduler: Scheduler, engine: Engine, prometheus: bool = False) -> None:
        self.scheduler = scheduler
        self.engine = engine
        self.provider = str(engine.runner.plan.chosen)
        self.started = time.time()
        self._lock = threading.Lock()
        # Plain tallies for the heartbeat (and to compute per-interval rates without a scrape).
        self.outcomes: Counter[str] = Counter()
        self.tokens_in = 0
        self.tokens_out = 0
        self.latency_sum = 0.0
        self.decode_tok_s_sum = 0.0
        self.decode_count = 0
        self._last: dict[str, float] = {}
        self.registry: Any = None
        if prometheus:
            self._build_prometheus()
        scheduler.on_step = self.step

    # -- observations (any thread) --

    def finished(self, transport: str, event: Event, elapsed_s: float) -> None:
        """One final reply sent: count its outcome; for a fresh completed one, its usage."""
        outcome = "completed" if event.kind == "final" else (event.code or "internal")
        usage = event.usage or {}
        fresh = event.kind == "final" and not event.replayed  # a replay's usage was counted once
        prompt = int(usage.get("prompt_tokens", 0)) if fresh else 0
        completion = int(usage.get("completion_tokens", 0)) if fresh else 0
        queue_s = float(usage.get("queue_s", 0.0))
        decode = float(usage.get("decode_tok_s", 0.0))
        with self._lock:
            self.outcomes[outcome] += 1
            self.tokens_in += prompt
            self.tokens_out += completion
            self.latency_sum += elapsed_s
            if fresh and completion > 1 and decode > 0:
                self.decode_tok_s_sum += decode
                self.decode_count += 1
        if self.registry is None:
            return
        self._requests.labels(transport, outcome).inc()
        self._latency.labels(transport).observe(elapsed_s)
        if not fresh:
            return
        self._tokens.labels("prompt").inc(prompt)
        self._tokens.labels("completion").inc(completion)
        self._cached.inc(int(usage.get("cached_tokens", 0)))
        self._queue_wait.observe(queue_s)
        if "ttft_s" in usage:  # the engine's is from prefill start; a client also waited in the queue
            self._ttft.observe(queue_s + float(usage["ttft_s"]))
        if completion > 1 and decode > 0:
            self._decode.observe(decode)
        if event.session is not None:
            hit = int(usage.get("cached_tokens", 0)) > 0
            self._session_cache.labels("hit" if hit else "miss").inc()

    def step(self, rows: int) -> None:
        """One decode step over `rows` sequences (the scheduler's worker calls this)."""
        if self.registry is not None:
            self._occupancy.observe(rows)

    # -- views --

    def kv_bytes(self) -> tuple[int, int]:
        """(reserved, used) KV cache bytes now: the batch buffer, live session slots, the system
        prompt's slot."""
        caches: dict[int, Any] = {}
        batch = self.scheduler.batch_cache
        sizes = [cache_bytes(batch, self.scheduler.live_rows)] if batch is not None else []
        conv = self.scheduler.conversations
        for _ in range(3):  # the worker may change the dict while we copy it: try again
            try:
                slots = [*conv._live.values(), conv._system_slot]
                break
            except RuntimeError:
                slots = []
        for slot in slots:
            if slot is not None and slot.cache is not None and slot.cache is not batch:
                caches[id(slot.cache)] = slot.cache
        sizes += [cache_bytes(c) for c in caches.values()]
        return sum(r for r, _ in sizes), sum(u for _, u in sizes)

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its Content-Type): what a `/metrics` handler returns."""
        if self.registry is None:
            raise ConfigError(INSTALL_HINT)
        prom = _prometheus()
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    def summary(self) -> dict[str, Any]:
        """The heartbeat: totals plus rates over the time since the previous summary."""
        now = time.time()
        with self._lock:
            total = sum(self.outcomes.values())
            errors = total - self.outcomes["completed"]
            current = {
                "t": now,
                "n": float(total),
                "lat": self.latency_sum,
                "dec": self.decode_tok_s_sum,
                "dn": float(self.decode_count),
            }
            last, self._last = self._last or {"t": self.started, "n": 0, "lat": 0, "dec": 0, "dn": 0}, current
            outcomes = dict(self.outcomes)
            tokens_in, tokens_out = self.tokens_in, self.tokens_out
        kv_reserved, kv_used = self.kv_bytes()
        dt = max(now - last["t"], 1e-9)
        dn = current["n"] - last["n"]
        ddn = current["dn"] - last["dn"]
        return {
            "ts": round(now, 3),
            "uptime_s": round(now - self.started, 1),
            "model": self.engine.bundle.name,
            "provider": self.provider,
            "requests": total,
            "errors": errors,
            "outcomes": outcomes,
            "qps": round(dn / dt, 4),
            "mean_latency_s": round((current["lat"] - last["lat"]) / dn, 4) if dn else None,
            "decode_tok_s": round((current["dec"] - last["dec"]) / ddn, 2) if ddn else None,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "queue_depth": self.scheduler.queue_depth,
            "in_flight": self.scheduler.in_flight,
            "kv_bytes": kv_used,
            "kv_reserved_bytes": kv_reserved,
        }

    # -- Prometheus --

    def _build_prometheus(self) -> None:
        prom = _prometheus()
        reg = self.registry = prom.CollectorRegistry(auto_describe=True)
        p = "edge_llm_"
        self._requests = prom.Counter(
            p + "requests", "Requests answered, by transport and outcome (completed or an error code)",
            ["transport", "outcome"], registry=reg,
        )  # fmt: skip
        self._latency = prom.Histogram(
            p + "request_duration_seconds", "End-to-end latency: message in to final reply out",
            ["transport"], buckets=_SECONDS, registry=reg,
        )  # fmt: skip
        self._queue_wait = prom.Histogram(
            p + "queue_wait_seconds", "Time a request waited for a free row", buckets=_SECONDS, registry=reg
        )
        self._ttft = prom.Histogram(
            p + "time_to_first_token_seconds", "Queue wait plus prefill until the first token",
            buckets=_SECONDS, registry=reg,
        )  # fmt: skip
        self._decode = prom.Histogram(
            p + "decode_tokens_per_second", "Decode speed of a request (tokens after the first)",
            buckets=_TOK_S, registry=reg,
        )  # fmt: skip
        self._tokens = prom.Counter(p + "tokens", "Tokens processed", ["kind"], registry=reg)
        self._cached = prom.Counter(
            p + "cached_prompt_tokens", "Prompt tokens whose KV was reused (no prefill)", registry=reg
        )
        self._session_cache = prom.Counter(
            p + "session_cache", "Session turns whose KV was still live (hit) or rebuilt (miss)",
            ["result"], registry=reg,
        )  # fmt: skip
        rows = max(1, self.scheduler.max_batch)
        self._occupancy = prom.Histogram(
            p + "batch_occupancy_rows", "Sequences advanced per decode step",
            buckets=tuple(float(n) for n in range(1, rows + 1)), registry=reg,
        )  # fmt: skip
        prom.Gauge(p + "batch_capacity_rows", "Rows the worker may run at once", registry=reg).set(rows)
        prom.Gauge(p + "queue_depth", "Requests waiting", registry=reg).set_function(
            lambda: self.scheduler.queue_depth
        )
        prom.Gauge(p + "in_flight", "Requests queued or running", registry=reg).set_function(
            lambda: self.scheduler.in_flight
        )
        prom.Gauge(p + "batch_rows_active", "Rows running now", registry=reg).set_function(
            lambda: self.scheduler.active_rows
        )
        kv = prom.Gauge(
            p + "kv_cache_bytes", "KV cache bytes: reserved (buffer capacity) and used (positions held)",
            ["kind"], registry=reg,
        )  # fmt: skip
        kv.labels("reserved").set_function(lambda: self.kv_bytes()[0])
        kv.labels("used").set_function(lambda: self.kv_bytes()[1])
        prom.Info(p + "server", "The loaded model and execution provider", registry=reg).info(
            {"model": self.engine.bundle.name, "provider": self.provider}
        )


class MetricsServer:
    """`--metrics HOST:PORT`: prometheus-client's own HTTP server on the private registry."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        prom = _prometheus()
        try:
            self.server, self.thread = prom.start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise TransportError(f"metrics: cannot listen on {host}:{port}: {exc}") from None
        self.host, self.port = host, int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)
