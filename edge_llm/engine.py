"""The engine: prompt in, streamed text out, through prefill and a decode loop over a KV cache.

In: a bundle folder (or `Bundle`) and `RunnerOptions`; per request, chat `messages`, a plain
`prompt` or token ids, and `SamplingParams`. Out: an iterator of `Chunk`s — text deltas that
never split a UTF-8 character, then one final chunk with the whole text, the finish reason
("stop", "length", "cancelled") and `Usage`.

The loop is deliberately small: `prefill` feeds the prompt (only what a reused `Slot` does not
already hold), `decode_one_token` feeds one token and samples the next, `generate` strings them
together and handles stop ids, stop strings and the context limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_llm.bundle import Bundle, load_bundle
from edge_llm.errors import ContextLengthError, RequestError
from edge_llm.runner import KVCache, RunnerOptions, make_runner
from edge_llm.sampling import SamplingParams, make_rng, sample
from edge_llm.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a reused slot (no prefill)
    ttft_s: float  # request start -> first token sampled
    prefill_s: float
    decode_s: float
    decode_tok_s: float  # tokens after the first / time after the first

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

    cache: KVCache | None = None
    ids: list[int] = field(default_factory=list)


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

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_len + max_tokens} exceeds the context window ({self.max_context})"
            )

    def prefill(self, ids: list[int], slot: Slot) -> tuple[np.ndarray, int]:
        """Bring `slot` up to `ids`, reusing its longest matching prefix; return last logits."""
        reuse = _common_prefix(slot.ids, ids) if slot.cache is not None else 0
        reuse = min(reuse, len(ids) - 1)  # at least one token must run to get logits
        if slot.cache is None or reuse == 0:
            slot.cache, reuse = self.runner.empty(1), 0
        else:
            self.runner.truncate(slot.cache, reuse)
        logits = self.runner.forward(np.array([ids[reuse:]], dtype=np.int64), slot.cache)
        slot.ids = list(ids)
        return logits[0], reuse

    def decode_one_token(self, token: int, slot: Slot) -> np.ndarray:
        logits = self.runner.forward(np.array([[token]], dtype=np.int64), slot.cache)
        slot.ids.append(token)
        return logits[0]

    def generate(
        self,
        ids: list[int],
        params: SamplingParams,
        slot: Slot | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Chunk]:
        """Stream the continuation of prompt `ids`; the last chunk has done=True and usage."""
        t0 = time.perf_counter()
        self.check_length(len(ids), params.max_tokens)
        slot = slot if slot is not None else Slot()
        rng = make_rng(params)
        stop_ids = set(params.stop_ids) | (set() if params.ignore_eos else set(self.tokenizer.eos_ids))
        seen = np.array(sorted(set(ids)), dtype=np.int64) if params.repetition_penalty != 1.0 else None
        decoder, stops = StreamDecoder(self.tokenizer), StopMatcher(params.stop)
        logits, cached = self.prefill(ids, slot)
        generated: list[int] = []
        t_first = time.perf_counter()
        finish, hit = "length", False
        while True:
            token = sample(logits, params, rng, seen)
            if not generated:
                t_first = time.perf_counter()
            if token in stop_ids:
                finish = "stop"
                break
            generated.append(token)
            if seen is not None and token not in seen:
                seen = np.union1d(seen, [token])
            delta, hit = stops.feed(decoder.push(token))
            if delta:
                yield Chunk(delta=delta)
            if hit:
                finish = "stop"
                break
            if len(generated) >= params.max_tokens:
                break
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
            logits = self.decode_one_token(token, slot)
        if not hit:  # after a stop string, nothing past it may leak out
            tail, _ = stops.feed(decoder.flush())
            tail += stops.finish()
            if tail:
                yield Chunk(delta=tail)
        t_end = time.perf_counter()
        n = len(generated)
        usage = Usage(
            prompt_tokens=len(ids),
            completion_tokens=n,
            cached_tokens=cached,
            ttft_s=t_first - t0,
            prefill_s=t_first - t0,
            decode_s=t_end - t_first,
            decode_tok_s=(n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0,
        )
        yield Chunk(done=True, text=stops.text, finish_reason=finish, usage=usage, token_ids=tuple(generated))

    def complete(self, ids: list[int], params: SamplingParams, slot: Slot | None = None) -> Chunk:
        """Run `generate` to the end and return its final chunk."""
        *_, last = self.generate(ids, params, slot)
        return last


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
