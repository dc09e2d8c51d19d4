"""The engine: prompt in, streamed text out, through prefill and a decode loop over a KV cache.

In: a bundle folder (or `Bundle`) and `RunnerOptions`; per request, chat `messages`, a plain
`prompt` or token ids, and `SamplingParams`. Out: an iterator of `Chunk`s — text deltas that
never split a UTF-8 character, then one final chunk with the whole text, the finish reason
("stop", "length", "cancelled") and `Usage`. Every delta is a prefix of what the uninterrupted
run streams: a cancelled generation drops the tail it was holding back instead of flushing it.

The loop is deliberately small: `prefill` feeds the prompt (only what a reused `Slot` does not
already hold), `decode_one_token` feeds one token and samples the next, `generate` strings them
together and handles stop ids, stop strings and the context limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_llm import batching, speculate
from edge_llm.bundle import Bundle, load_bundle
from edge_llm.errors import BundleError, ConstraintError, ContextLengthError, RequestError
from edge_llm.runner import KVCache, RunnerOptions, SharedCache, SharedRunner, StaticCache, make_runner
from edge_llm.sampling import SamplingParams, make_rng, sample
from edge_llm.structured import ResponseFormat
from edge_llm.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from edge_llm.constrain import Constraint, Grammars


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a reused slot (no prefill)
    ttft_s: float  # request start -> first token sampled
    prefill_s: float
    decode_s: float
    decode_tok_s: float  # tokens after the first / time after the first
    draft_tokens: int = 0  # speculation (trained draft or prompt lookup): tokens proposed ...
    accepted_draft_tokens: int = 0  # ... and kept (greedy: identical to plain decoding)
    draft_verifies: int = 0  # forwards that verified drafts (accepted / verifies: mean kept)
    provider: str = ""  # the execution provider that ran the graph ...
    cpu_fallback_nodes: int | None = None  # ... and how many of its nodes fell back to CPU

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Chunk:
    delta: str = ""
    done: bool = False
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class Slot:
    """A sequence's reusable KV state: `ids[i]` is the token whose KV sits at position i.

    Keep one per conversation: the next turn whose prompt starts with `ids` skips that prefill.
    """

    cache: KVCache | SharedCache | None = None
    ids: list[int] = field(default_factory=list)
    row: int | None = None  # set: the sequence lives in row `row` of a shared batch cache


# Finish reasons after which the held-back tail is part of the answer (see Generation._flush).
_NATURAL_ENDS = ("stop", "length")


class StopMatcher:
    """Finds stop strings in streamed text and holds back a tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (safe text to emit now, whether a stop string was hit)."""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self.hold), False

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


class Engine:
    def __init__(self, bundle: Bundle, options: RunnerOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options or RunnerOptions()
        self.tokenizer = Tokenizer(bundle)
        self.runner = make_runner(bundle, self.options)
        mode = self.options.speculation
        # The draft reads the main graph's hidden state: a variant graph chosen at load (int8 KV,
        # query_seqlens) has none, so there the draft is not used.
        draft_runs = bundle.graph.draft is not None and getattr(self.runner, "hidden_size", 0) > 0
        if mode == "auto":
            mode = "draft" if draft_runs else "lookup" if self.options.prompt_lookup else "off"
        elif mode == "draft" and bundle.graph.draft is not None and not draft_runs:
            raise BundleError(
                f"{bundle.path}: the trained draft runs only on the main graph, not on "
                f"{getattr(self.runner, 'graph_name', '?')} (set [runtime] kv_cache/ragged to pick it)"
            )
        # The trained draft (None: not used); prompt lookup's draft length (0: not used).
        self.draft = speculate.Draft(bundle, self.options) if mode == "draft" else None
        self.lookup = (self.options.prompt_lookup or 4) if mode == "lookup" else 0
        self._grammars: Grammars | None = None  # built on the first JSON request (llguidance)
        self.last_pos = -1  # where the latest slot forward's last real token sits (pad_decode: -2)

    @classmethod
    def load(cls, path: str | Path, options: RunnerOptions | None = None, verify: bool = True) -> Engine:
        return cls(load_bundle(path, verify=verify), options)

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    def encode_request(
        self,
        prompt: str | None = None,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids for a chat (`messages`, rendered with the model's template) or raw `prompt`."""
        if (prompt is None) == (messages is None):
            raise RequestError("give exactly one of prompt or messages")
        text = self.tokenizer.render_chat(messages) if messages is not None else prompt
        if not isinstance(text, str):
            raise RequestError("prompt must be a string")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def constraint(self, fmt: ResponseFormat | None) -> Constraint | None:
        """A fresh matcher enforcing `fmt` on one generation (None: plain text). RequestError when
        the 'structured' extra is missing or the schema cannot be enforced."""
        if fmt is None:
            return None
        if self._grammars is None:
            from edge_llm.constrain import Grammars  # llguidance: only when a request asks

            self._grammars = Grammars(
                self.bundle.tokenizer_path.read_text(encoding="utf-8"),
                self.bundle.architecture.vocab_size,
                self.tokenizer.eos_ids,
            )
        return self._grammars.constraint(fmt)

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_len + max_tokens} exceeds the context window ({self.max_context})"
            )

    def prefill(self, ids: list[int], slot: Slot) -> tuple[np.ndarray, int]:
        """Bring `slot` up to `ids`, reusing its longest matching prefix; return last logits."""
        reuse = self.reusable(slot, ids)
        if slot.cache is None:
            slot.cache = self.runner.empty(1)
        else:
            self.runner.truncate(slot.cache, reuse, slot.row or 0)
        logits = self._feed(np.array([ids[reuse:]], dtype=np.int64), slot)
        slot.ids = list(ids)
        return logits[0], reuse

    def reusable(self, slot: Slot, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the KV of `slot` holds already (a reused prefix),
        leaving at least one to run: its logits give the next token."""
        if slot.cache is None:
            return 0
        held = slot.ids[: int(slot.cache.lengths[slot.row or 0])]
        return min(_common_prefix(held, ids), len(ids) - 1)

    def _feed(self, tokens: np.ndarray, slot: Slot) -> np.ndarray:
        """Last-position logits after feeding `tokens` [1, S], in pieces of `prefill_chunk` when
        set: ORT keeps (in its arena) the largest workspace any forward needed, and that grows
        with tokens x context (measured on SmolLM2 INT8: +143 MB for one 2000-token forward,
        +47 MB in 256-token pieces), so a memory budget bounds the piece."""
        chunk = self.options.prefill_chunk
        if not chunk or tokens.shape[1] <= chunk:
            return self._forward_slot(tokens, slot)
        for start in range(0, tokens.shape[1], chunk):
            logits = self._forward_slot(tokens[:, start : start + chunk], slot)
        return logits

    def decode_one_token(self, token: int, slot: Slot) -> np.ndarray:
        logits = self._forward_slot(np.array([[token]], dtype=np.int64), slot)
        slot.ids.append(token)
        return logits[0]

    def _forward_slot(self, tokens: np.ndarray, slot: Slot, all_logits: bool = False) -> np.ndarray:
        self.last_pos = -1
        if tokens.shape[1] == 1 and self._pads(slot):
            # [token, token]: the second is a dummy whose KV lands past the length (cut off
            # below, never read); the first's logits come from the multi-token kernel path.
            logits = self._run_slot(np.repeat(tokens, 2, axis=1), slot, all_logits=True)
            row = slot.row or 0
            self.runner.truncate(slot.cache, int(slot.cache.lengths[row]) - 1, row)
            self.last_pos = -2  # the real token's hidden state (the draft's input)
            return logits[:, :1] if all_logits else logits[:, 0]
        return self._run_slot(tokens, slot, all_logits)

    def _run_slot(self, tokens: np.ndarray, slot: Slot, all_logits: bool) -> np.ndarray:
        if slot.row is None:
            return self.runner.forward(tokens, slot.cache, all_logits=all_logits)
        return self.runner.forward_rows(tokens, slot.cache, slot.row, all_logits=all_logits)

    def _pads(self, slot: Slot) -> bool:
        """Whether a one-token forward of `slot` runs padded to two ([runtime] pad_decode): on
        the shared-KV graph with per-position logits, while the dummy's position fits. Not on a
        graph that pads its attention itself (bundle.json `graph.kv_spare`, `[fuse]
        pad_query_row`): its 1-token forward already takes the verify's path, so pad_decode only
        matters for bundles exported without it."""
        cache = slot.cache
        return (
            self.options.pad_decode
            and not self.bundle.graph.kv_spare
            and self.all_logits
            and isinstance(cache, SharedCache)
            and int(cache.lengths[slot.row or 0]) + 2 <= cache.capacity
        )

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), V] for every position of `ids` from an empty cache (perplexity).

        A graph that returns only last-position logits is fed one token per step, which gives the
        same numbers as a full forward on the decode path the device actually runs.
        """
        cache = self.runner.empty(1)
        tokens = np.asarray(ids, dtype=np.int64)[None, :]
        if self.all_logits:
            return self.runner.forward(tokens, cache, all_logits=True)[0]
        return np.stack([self.runner.forward(tokens[:, i : i + 1], cache)[0] for i in range(tokens.shape[1])])

    def fork_slot(self, slot: Slot) -> Slot:
        """An independent copy of `slot` (a shared prefix such as a system prompt)."""
        cache = None if slot.cache is None else self.runner.fork(slot.cache)
        return Slot(cache, list(slot.ids))

    @property
    def can_batch(self) -> bool:
        """Whether `batch_cache` works: sequences of different lengths share one forward."""
        return self.runner.batches

    def recycle(self, cache: KVCache | SharedCache | StaticCache | None, template: Slot | None) -> Slot:
        """A new Slot (a copy of `template`, or empty) in the buffers of `cache`, which its owner
        no longer needs: a single-row shared cache's committed pages are reused, not doubled."""
        if not isinstance(cache, SharedCache) or cache.batch != 1 or cache.capacity < self.max_context:
            return self.fork_slot(template) if template is not None else Slot()
        if template is not None and isinstance(template.cache, SharedCache):
            cache.copy_row(0, template.cache, 0)
            return Slot(cache, list(template.ids))
        cache.lengths[0] = 0
        return Slot(cache, [])

    def batch_cache(self, rows: int) -> SharedCache:
        """A KV cache whose rows several sequences share, for `step` to advance together."""
        if not isinstance(self.runner, SharedRunner):
            raise BundleError(f"{self.bundle.path}: continuous batching needs a fused (shared-KV) bundle")
        return self.runner.empty(rows)

    def attach(self, slot: Slot, cache: SharedCache, row: int) -> Slot:
        """A Slot in row `row` of a batch cache, holding a copy of `slot`'s cached prefix."""
        if isinstance(slot.cache, SharedCache) and slot.ids:
            cache.copy_row(row, slot.cache, 0)
            return Slot(cache, list(slot.ids), row)
        cache.lengths[row] = 0
        return Slot(cache, [], row)

    def detach(self, batch_slot: Slot, into: Slot) -> None:
        """Copy a batch row's KV back into a standalone Slot (a session's next turn reuses it).

        The session's own single-row cache is reused when it has one: its pages are already
        committed, so a session costs one row of KV however many turns it takes."""
        if batch_slot.row is None or not isinstance(batch_slot.cache, SharedCache):
            raise ValueError("detach takes a Slot that lives in a batch cache row")
        single = into.cache
        if not isinstance(single, SharedCache) or into.row is not None or single.capacity < self.max_context:
            single = self.runner.empty(1)
        single.copy_row(0, batch_slot.cache, batch_slot.row)
        into.cache, into.ids, into.row = single, list(batch_slot.ids), None

    def start(
        self,
        ids: list[int],
        params: SamplingParams,
        slot: Slot | None = None,
        response_format: ResponseFormat | None = None,
    ) -> Generation:
        """Prefill a request and sample its first token; advance it with `step`."""
        slot = slot if slot is not None else Slot()
        seq = Generation(self, ids, params, slot, self.constraint(response_format))
        self.start_all([seq])
        return seq

    def start_all(self, seqs: list[Generation], fold: bool = False) -> None:
        """Prefill new generations and sample each one's first token.

        `fold` (other rows are running): on the query_seqlens graph, newcomers in batch rows are
        left pending instead, and `step` feeds their prompts in the running rows' forward
        (`edge_llm.batching`); their first token comes from a later step.

        Requests that arrive together and sit in adjacent empty rows of a batch cache share one
        right-padded forward: a prefill is a fixed cost per forward plus a little per token
        (measured: 8.8 ms for 1 token, 27.7 ms for 16), so eight short prompts cost about what
        two do alone. A row with a reused prefix (a session's next turn) runs alone.
        """
        if fold:
            seqs = batching.defer(self, seqs)
        for group in self._prefill_groups(seqs):
            if len(group) == 1:
                q = group[0]
                logits, q.cached = self.prefill(q.ids, q.slot)
                q.take(logits)
                q.hidden = self._hidden(0, self.last_pos)
                continue
            counts = np.array([len(q.ids) for q in group], dtype=np.int64)
            tokens = np.full((len(group), int(counts.max())), self.bundle.tokenizer.pad_id, dtype=np.int64)
            for i, q in enumerate(group):
                tokens[i, : counts[i]] = q.ids
            logits = self.runner.forward_rows(tokens, group[0].slot.cache, group[0].slot.row, counts=counts)
            for i, q in enumerate(group):
                q.slot.ids = list(q.ids)
                q.take(logits[i])
                q.hidden = self._hidden(i, -1)

    def _prefill_groups(self, seqs: list[Generation]) -> list[list[Generation]]:
        """Runs of adjacent empty batch rows whose padding stays under a third of the work (and
        whose padded tokens fit one `prefill_chunk`, when set); everything else alone."""
        alone: list[list[Generation]] = []
        runs: list[list[Generation]] = []
        for q in sorted(seqs, key=lambda q: -1 if q.slot.row is None else q.slot.row):
            s = q.slot
            if s.row is None or not isinstance(s.cache, SharedCache) or s.cache.lengths[s.row]:
                alone.append([q])
                continue
            run = runs[-1] if runs else None
            if run and s.cache is run[-1].slot.cache and s.row == run[-1].slot.row + 1:
                lens = [len(x.ids) for x in (*run, q)]
                padded, chunk = max(lens) * len(lens), self.options.prefill_chunk
                if padded <= 1.5 * sum(lens) and (not chunk or padded <= chunk):
                    run.append(q)
                    continue
            runs.append([q])
        return alone + runs

    def step(self, seqs: list[Generation]) -> None:
        """Advance every unfinished sequence by one token, in one forward where they share a
        batch cache (continuous batching), else one forward each (several tokens at once when
        speculation is on and its draft is accepted). A batch row speculates only while it runs
        alone: rows of a wider batch advance together, one token each per forward."""
        live = [q for q in seqs if not q.finished]
        alone = sum(q.slot.row is not None for q in live) <= 1
        rows = []
        for q in live:
            if (q.slot.row is None or alone) and self._speculate(q):
                continue
            # A lone row decodes through the slot path like an unbatched one (the same forward,
            # padded there under pad_decode); a folded newcomer's prompt goes in through step_rows.
            if q.slot.row is not None and not (alone and not batching.pending(q)):
                rows.append(q)
                continue
            q.take(self.decode_one_token(q.last, q.slot))
            q.hidden = self._hidden(0, self.last_pos)
        if rows:
            self._step_rows(rows)

    def _hidden(self, row: int, pos: int) -> np.ndarray | None:
        """The main graph's final hidden state at (row, pos) of the latest forward: the trained
        draft's input (None when no draft is used)."""
        if self.draft is None:
            return None
        return self.runner.hidden[row, pos].copy()

    def _speculate(self, q: Generation) -> bool:
        """Speculative decoding for one sequence (`edge_llm.speculate`: the trained draft, else
        prompt lookup); False if nothing to try (`speculate.eligible` decides)."""
        if not speculate.eligible(self, q, self.draft is not None):
            return False
        if self.draft is not None:
            return speculate.advance(self, self.draft, q, self.options.draft_tokens)
        return speculate.lookup(self, q, self.lookup)

    @property
    def all_logits(self) -> bool:
        """Whether the graph can return logits for every fed position (score, verify drafts)."""
        return self.bundle.graph.logits in ("all", "tail")

    def _step_rows(self, seqs: list[Generation]) -> None:
        batching.step_rows(self, seqs)  # + the pending prompts of folded newcomers

    def generate(
        self,
        ids: list[int],
        params: SamplingParams,
        slot: Slot | None = None,
        should_stop: Callable[[], bool] | None = None,
        response_format: ResponseFormat | None = None,
    ) -> Iterator[Chunk]:
        """Stream the continuation of prompt `ids`; the last chunk has done=True and usage."""
        seq = self.start(ids, params, slot, response_format)
        while True:
            delta = seq.pop_delta()
            if delta:
                yield Chunk(delta=delta)
            if seq.finished:
                break
            if should_stop is not None and should_stop():
                seq.cancel()
                continue
            self.step([seq])
        if seq.error is not None:
            raise seq.error
        yield seq.final()

    def complete(
        self,
        ids: list[int],
        params: SamplingParams,
        slot: Slot | None = None,
        response_format: ResponseFormat | None = None,
    ) -> Chunk:
        """Run `generate` to the end and return its final chunk."""
        *_, last = self.generate(ids, params, slot, response_format=response_format)
        return last


class Generation:
    """One request's generation state: sampling, stop rules, streamed text, timing.

    The engine feeds it logits (`take`), it picks the next token and decides whether it is done;
    transports read `pop_delta()` and, once `finished`, `final()`. With a `constraint` (a JSON
    response_format) only the tokens its grammar allows are sampled, and the answer ends when the
    grammar does; a constraint failure ends this generation alone (`error`), never its batch.
    """

    def __init__(
        self,
        engine: Engine,
        ids: list[int],
        params: SamplingParams,
        slot: Slot,
        constraint: Constraint | None = None,
    ) -> None:
        engine.check_length(len(ids), params.max_tokens)
        self.engine = engine
        self.t0 = time.perf_counter()
        self.t_first = self.t0
        self.ids, self.params, self.slot = ids, params, slot
        self.rng = make_rng(params)
        self.stop_ids = set(params.stop_ids) | (set() if params.ignore_eos else set(engine.tokenizer.eos_ids))
        self.seen = np.array(sorted(set(ids)), dtype=np.int64) if params.repetition_penalty != 1.0 else None
        self.decoder, self.stops = StreamDecoder(engine.tokenizer), StopMatcher(params.stop)
        self.generated: list[int] = []
        self.cached = 0
        self.drafted = self.accepted = self.verifies = 0  # speculation: proposed / kept tokens, verifies
        self.spec_backoff = self.spec_wait = 0
        self.rejected = 0  # trained-draft verifies that ended at a rejected draft (its acceptance)
        # The main graph's final hidden state where `last` was predicted (the draft's input).
        self._hidden: np.ndarray | None = None
        # An eagle1 draft's unread history (each state set, paired with the generated token after
        # it) and its KV cache (speculate.DraftKV).
        self.trail: list[np.ndarray] | None = [] if engine.draft and engine.draft.stateful else None
        self.draft_kv: speculate.DraftKV | None = None
        self.constraint = constraint
        self.error: ConstraintError | None = None  # set with finish "error"
        self.finish: str | None = None
        self.last = -1
        self._pending = ""
        self._hit = False

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def hidden(self) -> np.ndarray | None:
        return self._hidden

    @hidden.setter
    def hidden(self, state: np.ndarray | None) -> None:
        self._hidden = state
        if self.trail is not None and state is not None:
            self.trail.append(state)

    def take(self, logits: np.ndarray) -> None:
        """Sample from the logits of the last fed position and account for the new token."""
        try:
            allowed = self.constraint.allowed() if self.constraint is not None else None
        except ConstraintError as exc:
            self.error, self.finish = exc, "error"
            return
        self.accept(sample(logits, self.params, self.rng, self.seen, allowed))

    def accept(self, token: int) -> None:
        """Account for the next token (sampled, or a verified speculative draft token)."""
        if not self.generated and self.last < 0:
            self.t_first = time.perf_counter()
        self.last = token
        if token in self.stop_ids:
            self.finish = "stop"
            return
        self.generated.append(token)
        if self.constraint is not None:
            try:
                self.constraint.consume(token)
            except ConstraintError as exc:
                self.error, self.finish = exc, "error"
                return
        if self.seen is not None and token not in self.seen:
            self.seen = np.union1d(self.seen, [token])
        delta, self._hit = self.stops.feed(self.decoder.push(token))
        self._pending += delta
        if self._hit or (self.constraint is not None and self.constraint.complete):
            self.finish = "stop"  # a stop string, or the JSON is whole: only EOS could follow
        elif len(self.generated) >= self.params.max_tokens:
            self.finish = "length"

    def cancel(self) -> None:
        if self.finish is None:
            self.finish = "cancelled"

    def pop_delta(self) -> str:
        """Text produced since the last call (after a natural finish: with the held-back tail)."""
        self._flush()
        out, self._pending = self._pending, ""
        return out

    def _flush(self) -> None:
        """Once ended by a stop or the length limit, release text held back for UTF-8 or
        stop-string matching. A cancelled (or failed) generation keeps it back: held text is not
        yet what the uninterrupted run would stream there (the next token may complete a
        character or a stop string), and a client that retries after a server went away mid-way
        gets the rest from a regeneration with the same seed, seq by seq. Flushing it once sent a
        chunk the regeneration then sent differently under the same seq, and the client's
        streamed text stopped being a prefix of the final (tests/edge_llm/test_engine.py)."""
        if self.finish in _NATURAL_ENDS and not self._hit:  # after a stop string nothing may leak
            tail, _ = self.stops.feed(self.decoder.flush())
            self._pending += tail + self.stops.finish()
            self._hit = True  # flushed once

    def final(self) -> Chunk:
        self._flush()
        t_end = time.perf_counter()
        n = len(self.generated)
        usage = Usage(
            prompt_tokens=len(self.ids),
            completion_tokens=n,
            cached_tokens=self.cached,
            ttft_s=self.t_first - self.t0,
            prefill_s=self.t_first - self.t0,
            decode_s=t_end - self.t_first,
            decode_tok_s=(n - 1) / (t_end - self.t_first) if n > 1 and t_end > self.t_first else 0.0,
            draft_tokens=self.drafted,
            accepted_draft_tokens=self.accepted,
            draft_verifies=self.verifies,
            provider=self.engine.runner.provider,
            cpu_fallback_nodes=self.engine.runner.cpu_fallback_nodes,
        )
        # Interrupted: the text is what was streamed, never the held-back tail (see _flush).
        text = self.stops.text if self.finish in _NATURAL_ENDS else self.stops.text[: self.stops.emitted]
        return Chunk(
            done=True,
            text=text,
            finish_reason=self.finish,
            usage=usage,
            token_ids=tuple(self.generated),
        )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
