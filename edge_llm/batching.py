"""Decode steps over the rows of a batch KV cache, with newcomers' prompts folded in.

One forward advances every running row by one token. On the query_seqlens ("ragged") graph a
request that arrives while others run need not prefill alone (a batch-1 forward while every
running row waits): `defer` leaves its prompt pending, and each later step feeds the next piece
of it in the same forward as the running rows' tokens (rows right-padded to the widest piece,
`query_seqlens` saying each row's count). Once its whole prompt is in, the row samples its first
token from that step's logits and decodes like the others. The output is the same token for
token as prefilling alone: the same positions get the same keys and values.

The piece size is a cost trade: padding is computed like real tokens, so a piece of c tokens
makes the step cost about rows x c token-rows instead of rows. Measured on SmolLM2 (2 cores,
benchmarks/README.md "Batched prefill"): a batch-8 step feeding 2 / 4 tokens per row cost 1.3x /
2.0x a plain one, so a 21-token prompt folded 4 tokens a step cost the running rows ~4.4x the
stall of prefilling it alone; one token per step (`[runtime] fold_padding` 0, the default) adds no
padding but delays the newcomer's first token by len(prompt) steps and keeps its row busy
meanwhile — with 8 staggered arrivals it gave no more throughput than prefilling alone and ~9x
the time to first token. So folding is off unless a board asks (`[runtime] fold_max`: prompts of
up to that many tokens fold), for hardware where a wider step costs about what a narrow one does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_llm.runner import SharedCache

if TYPE_CHECKING:
    from edge_llm.engine import Engine, Generation


def pending(q: Generation) -> bool:
    """Whether `q` still has prompt tokens to feed (deferred, no token sampled yet)."""
    return q.last < 0 and not q.finished and len(q.slot.ids) < len(q.ids)


def defer(engine: Engine, seqs: list[Generation]) -> list[Generation]:
    """Leave the prompts of newcomers in batch rows pending (their KV prefix reused as a prefill
    would); return the others, which the caller prefills as before."""
    if not engine.runner.ragged or not engine.options.fold_max:
        return seqs
    rest = []
    for q in seqs:
        s = q.slot
        if s.row is None or not isinstance(s.cache, SharedCache):
            rest.append(q)
            continue
        reuse = engine.reusable(s, q.ids)
        if len(q.ids) - reuse > engine.options.fold_max:
            rest.append(q)
            continue
        engine.runner.truncate(s.cache, reuse, s.row)
        s.ids = list(q.ids[:reuse])
        q.cached = reuse
    return rest


def fold_piece(rows: int, left: int, room: int, padding: int) -> int:
    """Prompt tokens a pending row feeds in a step of `rows` rows: >= 1, <= what is left, and
    <= `room` (positions every row of the step still has: the forward is `rows` x piece), with
    at most `padding` token-rows of padding (`[runtime] fold_padding`) in the step."""
    return max(1, min(left, room, 1 + padding // max(rows, 1)))


def step_rows(engine: Engine, seqs: list[Generation]) -> None:
    """One forward for every row in `seqs` (one batch cache): running rows feed their last
    token, pending rows the next piece of their prompt; each row takes its logits."""
    cache = seqs[0].slot.cache
    if any(q.slot.cache is not cache for q in seqs):
        raise ValueError("batched sequences must share one batch cache")
    by_row = {q.slot.row: q for q in seqs}
    first, last = min(by_row), max(by_row)
    span = last - first + 1
    room = cache.capacity - int(cache.lengths[first : last + 1].max())
    # With no row decoding nobody waits for the prompts: they go in whole.
    waiting = any(not pending(q) for q in by_row.values())
    feeds: dict[int, list[int]] = {}
    for r, q in by_row.items():
        if pending(q):
            done, left = len(q.slot.ids), len(q.ids) - len(q.slot.ids)
            piece = fold_piece(span, left, room, engine.options.fold_padding) if waiting else min(left, room)
            feeds[r] = q.ids[done : done + piece]
        else:
            feeds[r] = [q.last]
    width = max(len(f) for f in feeds.values())
    pad = engine.bundle.tokenizer.pad_id
    tokens = np.full((span, width), pad, np.int64)
    counts = np.ones(span, np.int64)
    for r, f in feeds.items():
        tokens[r - first, : len(f)] = f
        counts[r - first] = len(f)
    advance = np.array([r in by_row for r in range(first, last + 1)])
    logits = engine.runner.forward_rows(
        tokens, cache, first, advance=advance, counts=counts if width > 1 else None
    )
    for r, q in by_row.items():
        if pending(q):
            q.slot.ids.extend(feeds[r])
            if len(q.slot.ids) < len(q.ids):
                continue  # more prompt next step
        else:
            q.slot.ids.append(q.last)
        q.take(logits[r - first])
        q.hidden = engine._hidden(r - first, -1)  # the trained draft's input (None without one)
