"""Graph runners: one ONNX Runtime session and the KV cache that goes with its layout.

In: a `Bundle` and `RunnerOptions` (providers, threads). Out: a runner whose `forward(tokens,
cache)` advances a `KVCache` by S tokens for B sequences and returns logits, allocating nothing
per step that it can reuse: present KV tensors come back as ORT-owned `OrtValue`s that are bound
straight back as the next step's past (IO binding, no copy through numpy).

Layouts (bundle.json `graph.kv_layout`):
- "concat" (optimum export): past [B, kv, P, d] -> present [B, kv, P+S, d].
- "shared" (fused GQA export): one [B, kv, max_ctx, d] buffer per layer, preallocated once,
  bound as both past and present so the graph writes new entries in place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edge_llm.bundle import Bundle, check_graph_io
from edge_llm.errors import BundleError, ContextLengthError
from edge_llm.providers import ProviderPlan, ProviderSpec, plan_providers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOptions:
    providers: tuple[ProviderSpec, ...] = (ProviderSpec("cpu"),)
    threads: int = 0  # 0: one per core
    spin: bool = True  # busy-wait between ops: lower latency per token on an idle board
    max_context: int = 0  # 0: the bundle's context length (shared layout: buffer size)
    max_batch: int = 8  # shared layout: rows preallocated in the KV buffer


@dataclass
class KVCache:
    """KV state of B sequences (rows). `lengths[b]` = tokens already in row b's cache.

    concat layout: rows share one padded length (left padding, masked out).
    shared layout: rows live in fixed slots of preallocated buffers.
    """

    past: list[ort.OrtValue]
    lengths: np.ndarray
    pad: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])


def session_options(options: RunnerOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = options.threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    return so


class ConcatRunner:
    """Runs an optimum-style graph (concatenating KV cache, all-position logits)."""

    def __init__(self, bundle: Bundle, options: RunnerOptions) -> None:
        self.bundle = bundle
        self.options = options
        self.plan: ProviderPlan = plan_providers(options.providers)
        try:
            self.session = ort.InferenceSession(
                str(bundle.graph_path),
                sess_options=session_options(options),
                providers=self.plan.providers,
                provider_options=self.plan.provider_options,
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{bundle.graph_path}: onnxruntime cannot load the graph: {exc}") from None
        check_graph_io(
            bundle,
            [i.name for i in self.session.get_inputs()],
            [o.name for o in self.session.get_outputs()],
        )
        arch = bundle.architecture
        self.layers = arch.num_layers
        self.kv_shape = (arch.num_kv_heads, arch.head_dim)
        self.max_context = min(options.max_context or arch.context_length, arch.context_length)
        g = bundle.graph
        self.past_names = [
            n for i in range(self.layers) for n in (g.past_key.format(i=i), g.past_value.format(i=i))
        ]
        self.present_names = [
            n for i in range(self.layers) for n in (g.present_key.format(i=i), g.present_value.format(i=i))
        ]
        self.has_position_ids = "position_ids" in g.inputs
        self.device = "cpu"
        log.info("runner: %s on %s", bundle.graph_path.name, self.plan.chosen)

    def empty(self, batch: int = 1) -> KVCache:
        zeros = np.zeros((batch, *self.kv_shape[:1], 0, self.kv_shape[1]), dtype=np.float32)
        past = [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in self.past_names]
        return KVCache(past, np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64))

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Feed tokens [B, S] after `cache`; return logits [B, V] (last position) or [B, S, V]."""
        batch, steps = tokens.shape
        width = int(cache.lengths.max() + cache.pad.max()) if batch else 0  # padded past length
        if width + steps > self.max_context:
            raise ContextLengthError(
                f"context full: {width} cached + {steps} new tokens > {self.max_context}"
            )
        mask = np.ones((batch, width + steps), dtype=np.int64)
        for b in range(batch):
            mask[b, : cache.pad[b]] = 0
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if self.has_position_ids:
            pos = cache.lengths[:, None] + np.arange(steps, dtype=np.int64)[None, :]
            binding.bind_cpu_input("position_ids", pos)
        for name, value in zip(self.past_names, cache.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        cache.past = list(outs[1:])
        cache.lengths = cache.lengths + steps
        logits = outs[0].numpy()
        return logits if all_logits else logits[:, -1, :]

    def truncate(self, cache: KVCache, length: int) -> None:
        """Keep the first `length` cached tokens of a single-row cache (prefix reuse, rollback)."""
        if cache.batch != 1 or cache.pad[0]:
            raise ValueError("truncate works on an unpadded single-sequence cache")
        if length >= int(cache.lengths[0]):
            return
        cache.past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length, :]))
            for v in cache.past
        ]
        cache.lengths = np.array([length], dtype=np.int64)


def make_runner(bundle: Bundle, options: RunnerOptions) -> ConcatRunner:
    if bundle.graph.kv_layout == "concat":
        return ConcatRunner(bundle, options)
    raise BundleError(f"{bundle.path}: kv_layout {bundle.graph.kv_layout!r} is not supported yet")
