"""Drive and measure a graph written by `export.fuse`: a reference decode-loop driver, timings,
and numeric checks against transformers.

In: a fused `model.onnx` (and for the checks the Hugging Face folder it came from).
Out: `FusedRunner`, the minimal correct way to feed the graph (shared KV buffers bound with IO
binding, attention_mask built from per-row lengths); `bench_*` timings in ms per forward;
`greedy_match` / `top1_agreement` numeric checks. CLI: `python -m export.fuse_check --help`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def make_session(
    model: Path | str,
    threads: int = 2,
    spin: bool = True,
    level: str = "all",
    mem_pattern: bool = True,
    arena: bool = True,
    config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[level]
    so.enable_mem_pattern = mem_pattern
    so.enable_cpu_mem_arena = arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def graph_facts(session: ort.InferenceSession) -> dict[str, Any]:
    """Layers, KV heads, head dim, vocab and logits mode, read back from the graph IO."""
    ins = {i.name: i for i in session.get_inputs()}
    outs = {o.name: o for o in session.get_outputs()}
    kv = ins["past_key_values.0.key"].shape
    logits = outs["logits"].shape
    return {
        "layers": sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key")),
        "kv_heads": int(kv[1]),
        "head_dim": int(kv[3]),
        "vocab": int(logits[2]),
        "last": logits[1] == 1,
        "query_seqlens": "query_seqlens" in ins,
    }


class FusedRunner:
    """Feeds a fused graph: one preallocated [B, kv_heads, capacity, head_dim] buffer per layer
    and K/V, bound as both past and present, so GQA writes new rows in place (no copy).

    `lengths[b]` is how many positions row b holds. `step` appends each row's new tokens
    (right padded to S) and returns the logits; `truncate` drops tokens (rejected drafts) by
    lowering the length: stale rows beyond it are simply overwritten later.
    """

    def __init__(self, session: ort.InferenceSession, batch: int, capacity: int) -> None:
        self.session = session
        self.facts = graph_facts(session)
        self.batch, self.capacity = batch, capacity
        shape = (batch, self.facts["kv_heads"], capacity, self.facts["head_dim"])
        self.kv = {
            f"{i}.{kind}": np.zeros(shape, np.float32)
            for i in range(self.facts["layers"])
            for kind in ("key", "value")
        }
        self.lengths = np.zeros(batch, np.int64)

    def _bind_kv(self, io: ort.IOBinding, rows: slice) -> None:
        for name, buf in self.kv.items():
            view = buf[rows]  # a run of whole rows of a C-contiguous buffer is contiguous
            ptr, shape = view.ctypes.data, list(view.shape)
            io.bind_input(f"past_key_values.{name}", "cpu", 0, np.float32, shape, ptr)
            io.bind_output(f"present.{name}", "cpu", 0, np.float32, shape, ptr)

    def step(
        self,
        ids: np.ndarray,
        new_lens: Sequence[int] | None = None,
        rows: slice | None = None,
    ) -> np.ndarray:
        """Run ids [b, S] for `rows` (default: all) of the batch; returns logits [b, 1|S, V].

        new_lens[b] = real tokens in row b (the rest is right padding); default S for all.
        Rows with new_lens 0 are idle (their cache is untouched; needs query_seqlens input).
        """
        rows = rows or slice(0, self.batch)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b, s = ids.shape
        new = np.full(b, s, np.int64) if new_lens is None else np.asarray(new_lens, np.int64)
        total = self.lengths[rows] + new
        if total.max() > self.capacity:
            raise ValueError(f"row totals {total.tolist()} exceed the KV capacity {self.capacity}")
        width = int(max(total.max(), s))
        mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)  # ones, then zeros
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        if self.facts["query_seqlens"]:
            io.bind_cpu_input("query_seqlens", new.astype(np.int32))
        elif not np.all((new == s) | (self.lengths[rows] == 0)):
            raise ValueError("rows with fewer than S new tokens over a past need query_seqlens")
        logits = np.empty((b, 1 if self.facts["last"] else s, self.facts["vocab"]), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._bind_kv(io, rows)
        self.session.run_with_iobinding(io)
        self.lengths[rows] = total
        return logits

    def truncate(self, row: int, length: int) -> None:
        self.lengths[row] = min(int(self.lengths[row]), length)


# --------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) wall ms of fn; min is the least noisy number on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def bench_fused(
    session: ort.InferenceSession, batch: int, seq: int, past: int, capacity: int, runs: int
) -> tuple[float, float]:
    """One forward of `seq` tokens per row on top of `past` cached ones, repeated in place."""
    runner = FusedRunner(session, batch, capacity)
    ids = np.random.default_rng(0).integers(0, runner.facts["vocab"], (batch, seq))

    def once() -> None:
        runner.lengths[:] = past
        runner.step(ids)

    return time_ms(once, runs)


def bench_optimum(
    session: ort.InferenceSession, batch: int, seq: int, past: int, runs: int
) -> tuple[float, float]:
    """Same shapes on a plain optimum export (concat KV cache, past copied into present)."""
    ins = {i.name: i for i in session.get_inputs()}
    kv = ins["past_key_values.0.key"].shape
    rng = np.random.default_rng(0)
    io = session.io_binding()
    keep = []
    for name in ins:
        if name.startswith("past_key_values."):
            arr = rng.standard_normal((batch, kv[1], past, kv[3])).astype(np.float32)
            keep.append(arr)
            io.bind_cpu_input(name, arr)
    for out in session.get_outputs():
        io.bind_output(out.name, "cpu")
    io.bind_cpu_input("input_ids", rng.integers(0, 1000, (batch, seq)).astype(np.int64))
    io.bind_cpu_input("attention_mask", np.ones((batch, past + seq), np.int64))
    if "position_ids" in ins:
        pos = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        io.bind_cpu_input("position_ids", pos)
    return time_ms(lambda: session.run_with_iobinding(io), runs)
