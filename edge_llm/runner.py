"""Graph runners: one ONNX Runtime session and the KV cache that goes with its layout.

In: a `Bundle` and `RunnerOptions` (providers, threads). Out: a runner whose `forward(tokens,
cache)` advances a `KVCache` by S tokens for B sequences and returns logits, allocating nothing
per step that it can reuse: present KV tensors come back as ORT-owned `OrtValue`s that are bound
straight back as the next step's past (IO binding, no copy through numpy).

Layouts (bundle.json `graph.kv_layout`):
- "concat" (optimum export): past [B, kv, P, d] -> present [B, kv, P+S, d].
- "shared" (fused GQA export): one [B, kv, max_ctx, d] buffer per layer, preallocated once,
  bound as both past and present so the graph writes new entries in place.
- "static" (fixed-shape graphs for NPUs, `export/fix_shapes.py`): a decode graph (1 token) and a
  prefill graph (a chunk of C tokens), both over a fixed past of P positions; one [1, kv, P, d]
  buffer per layer whose unused positions the attention mask hides; presents are the new
  positions only, copied into the buffer after each call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_llm import plugin_eps
from edge_llm.board import RunnerOptions
from edge_llm.bundle import PAD_INPUT, Bundle, check_graph_io, check_requirements, choose_graph
from edge_llm.errors import BundleError, ContextLengthError
from edge_llm.providers import ProviderPlan, placement_from_profile, plan_providers, with_bundle_defaults

log = logging.getLogger(__name__)
_PROFILE_IDS = itertools.count()


@dataclass
class KVCache:
    """KV state of the concat layout: B rows of equal length `lengths[b]` (ORT-owned tensors).

    Sequences of different lengths batch on the shared layout (`SharedCache`) instead.
    """

    past: list[ort.OrtValue]
    lengths: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])


def session_options(options: RunnerOptions, prefused: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # A fused graph has nothing left for the extended optimizers to fuse; skipping them took
    # session start from 0.60 s to 0.40 s for SmolLM2 at the same per-token cost (measured here).
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if prefused else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    so.intra_op_num_threads = options.threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    return so


def lazy_zeros(shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A zero array (float32 unless told) whose memory is committed 4 KiB page by page as written.

    np.zeros asks for transparent huge pages on arrays >= 4 MiB, so writing the first positions
    of each head commits (and zeroes) whole 2 MiB pages: an 8-row SmolLM2 cache took RSS from
    248 to 866 MiB and its first prefill from 88 to 831 ms (measured). Anonymous mmap pages
    without huge pages grow with the positions actually used (278 MiB), at the same decode speed.
    """
    count, dtype = int(np.prod(shape)), np.dtype(dtype)
    buf = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux with THP "always": opt out explicitly
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype, count=count).reshape(shape)


def _drop_profile(session: ort.InferenceSession) -> None:
    name = session.end_profiling()  # "" when not profiling (any more)
    if name:
        Path(name).unlink(missing_ok=True)


# ONNX tensor types a shared KV buffer may have, as onnxruntime names them.
_KV_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
}


class _SessionRunner:
    """What both layouts share: the ORT session, IO checks, KV tensor names."""

    # Whether one forward can advance several sequences of different lengths (rows of one
    # cache, `forward_rows`): the scheduler asks this instead of testing the runner's class.
    batches = False

    def __init__(self, bundle: Bundle, options: RunnerOptions) -> None:
        self.bundle = bundle
        self.options = options
        check_requirements(bundle, ort.__version__)  # a one-line refusal instead of INVALID_GRAPH
        # The bundle's provider options (its target's, measured) beneath the profile's own.
        specs = with_bundle_defaults(options.providers, bundle.provider_options)
        self.plan: ProviderPlan = plan_providers(specs)
        # Which of the bundle's graphs (KV type, query_seqlens where this onnxruntime has it). One
        # row is never ragged, so a single-stream engine takes the portable graph: on onnxruntime
        # 1.32 its batch-1 decode was 1.10-1.17x the query_seqlens graph's (compare.py --portable,
        # two quiet runs of 15 interleaved rounds; benchmarks/README.md).
        ragged = options.ragged and options.max_batch > 1
        self.graph_name, variant = choose_graph(bundle, options.kv_cache, ragged, ort.__version__)
        # query_seqlens: rows of one forward may feed different numbers of tokens over any past.
        self.ragged = bool(variant["query_seqlens"])
        self.kv_cache = str(variant["kv_cache"])
        self.session_file = self.graph_file(self.graph_name)  # an EPContext model, or the graph
        self.session = self.open_session(
            self.session_file,
            prefused=bundle.graph.kv_layout == "shared",
            extra_inputs=tuple({"query_seqlens"} - set(bundle.graph.inputs)) if self.ragged else (),
            variant=self.graph_name != bundle.graph.file,
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
        self.device = "cpu"
        # Node placement: measured on the first run (onnxruntime profiling) when a provider other
        # than CPU leads; with CPU alone every node runs on CPU and nothing is measured.
        self.placement: dict[str, int] | None = None
        # A profiling session that never runs would write its profile when destroyed: drop it.
        weakref.finalize(self, _drop_profile, self.session)
        log.info("runner: %s (%s KV) on %s", self.session_file.name, g.kv_layout, self.plan.chosen)

    def graph_file(self, name: str) -> Path:
        """The file to load for graph `name`: its compiled EPContext model when the bundle has
        one for the provider that leads (a QNN context binary: no compile on the board), else
        the graph itself (any other provider, or CPU when the plugin is absent)."""
        g = self.bundle.graph
        context = g.contexts.get(name) if g.context_provider == self.plan.chosen else None
        return self.bundle.path / (context or name)

    @property
    def provider(self) -> str:
        """The execution provider the graph was given to first (the rest falls back to CPU)."""
        return self.session.get_providers()[0]

    @property
    def cpu_fallback_nodes(self) -> int | None:
        """Nodes that ran on CPU although another provider leads (None: not measured yet)."""
        if self.plan.chosen == "CPUExecutionProvider":
            return 0
        return None if self.placement is None else self.placement.get("CPUExecutionProvider", 0)

    def profiled(self) -> None:
        """After a run: read the first run's profile into `placement` (then profiling stops)."""
        if self.placement is None and self.plan.chosen != "CPUExecutionProvider":
            name = self.session.end_profiling()  # "" when this session was not profiling
            self.placement = placement_from_profile(name) if name else {}
            if name:
                Path(name).unlink(missing_ok=True)
            if self.placement and not self.placement.get(self.plan.chosen):
                # onnxruntime does not say so: e.g. OpenVINO asked for an NPU that this machine
                # lacks took no node, and the whole graph ran on CPU.
                log.warning(
                    "runner: %s took none of the graph's %d nodes: everything runs on CPU (its device"
                    " may be absent here; `edge-llm doctor` lists what this machine offers)",
                    self.plan.chosen,
                    sum(self.placement.values()),
                )

    def open_session(
        self,
        path: Path,
        prefused: bool = False,
        profile: bool = True,
        extra_inputs: tuple[str, ...] = (),
        variant: bool = False,
    ) -> ort.InferenceSession:
        """An ORT session on the planned providers for a graph whose IO the manifest describes
        (`profile`: profile its first run to count node placement, see `profiled`)."""
        so = session_options(self.options, prefused=prefused)
        if profile and self.plan.chosen != "CPUExecutionProvider":
            so.enable_profiling = True
            # One name per session: onnxruntime opens the file when the session starts and adds
            # only the second, so two sessions started within a second (several engines in one
            # process) wrote one path, and the first to read its profile removed the other's.
            name = f"edge-llm-placement-{os.getpid()}-{next(_PROFILE_IDS)}"
            so.profile_file_prefix = str(Path(tempfile.gettempdir()) / name)
        try:
            args = self.plan.session_args(so)
            # A plugin's native code may print on stdout, which carries answers and JSON.
            with plugin_eps.native_stdout_to_stderr() if self.plan.by_device else contextlib.nullcontext():
                session = ort.InferenceSession(str(path), sess_options=so, **args)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: onnxruntime cannot load the graph: {exc}") from None
        check_graph_io(
            self.bundle,
            [i.name for i in session.get_inputs()],
            [o.name for o in session.get_outputs()],
            extra_inputs,
            variant,
        )
        return session

    def check_room(self, have: int, steps: int) -> None:
        if have + steps > self.max_context:
            raise ContextLengthError(f"context full: {have} cached + {steps} new tokens > {self.max_context}")


class ConcatRunner(_SessionRunner):
    """Runs an optimum-style graph (concatenating KV cache, all-position logits)."""

    def __init__(self, bundle: Bundle, options: RunnerOptions) -> None:
        super().__init__(bundle, options)
        self.has_position_ids = "position_ids" in bundle.graph.inputs

    def empty(self, batch: int = 1) -> KVCache:
        zeros = np.zeros((batch, *self.kv_shape[:1], 0, self.kv_shape[1]), dtype=np.float32)
        past = [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in self.past_names]
        return KVCache(past, np.zeros(batch, dtype=np.int64))

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Feed tokens [B, S] after `cache`; return logits [B, V] (last position) or [B, S, V]."""
        batch, steps = tokens.shape
        width = int(cache.lengths.max()) if batch else 0
        self.check_room(width, steps)
        mask = np.ones((batch, width + steps), dtype=np.int64)
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
        self.profiled()
        outs = binding.get_outputs()
        cache.past = list(outs[1:])
        cache.lengths = cache.lengths + steps
        logits = outs[0].numpy()
        return logits if all_logits else logits[:, -1, :]

    def fork(self, cache: KVCache) -> KVCache:
        """An independent copy (present tensors are never written in place, so sharing the
        OrtValues is safe: a forward replaces them rather than mutating them)."""
        return KVCache(list(cache.past), cache.lengths.copy())

    def truncate(self, cache: KVCache, length: int, row: int = 0) -> None:
        """Keep the first `length` cached tokens of a single-row cache (prefix reuse, rollback)."""
        if cache.batch != 1:
            raise ValueError("truncate works on a single-sequence cache")
        if length >= int(cache.lengths[0]):
            return
        cache.past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length, :]))
            for v in cache.past
        ]
        cache.lengths = np.array([length], dtype=np.int64)


@dataclass
class SharedCache:
    """Preallocated KV buffers [rows, kv_heads, capacity + kv_spare, head_dim], one per
    past/present pair: `capacity` is what a sequence may fill; a padded graph (bundle.json
    `graph.kv_spare`) writes its dummy query row's KV one position past the new tokens.

    Row b holds `lengths[b]` positions; positions past that are stale and simply overwritten,
    so dropping tokens (a rejected draft, a diverging chat turn) is just lowering the length.
    """

    buffers: list[np.ndarray]
    lengths: np.ndarray
    capacity: int
    bindings: dict[tuple[int, int, int], ort.IOBinding] = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def copy_row(self, row: int, source: SharedCache, source_row: int) -> None:
        """Make row `row` hold `source`'s row `source_row`, copied buffer to buffer: no parked
        copy in between, so moving a sequence between caches needs no transient memory."""
        n = int(source.lengths[source_row])
        if n > self.capacity:
            raise ContextLengthError(f"context full: {n} cached tokens > {self.capacity}")
        for buf, src in zip(self.buffers, source.buffers, strict=True):
            buf[row, :, :n] = src[source_row, :, :n]
        self.lengths[row] = n


class SharedRunner(_SessionRunner):
    """Runs a fused GroupQueryAttention graph over a KV buffer shared by past and present.

    Each step binds row views of the preallocated buffers as both past and present input and
    output, so the graph appends new keys/values in place: no per-token allocation or copy.
    """

    batches = True

    def __init__(self, bundle: Bundle, options: RunnerOptions) -> None:
        super().__init__(bundle, options)
        # "last": one row of logits per sequence; "tail": the last `logits_to_keep` (a runtime
        # input: 1 while decoding, S to score or verify a speculative draft); "all": every row.
        self.logits_kind = bundle.graph.logits
        self.vocab = bundle.architecture.vocab_size
        self._logits: dict[tuple[int, int], np.ndarray] = {}
        # A bundle with a trained draft: the graph also returns the final hidden state of the
        # positions it returns logits for (the draft's input), bound like the logits.
        # Variant graphs (export/variants.py: int8 KV, query_seqlens) carry no such output.
        main = self.graph_name == bundle.graph.file
        self.hidden_size = (
            bundle.architecture.hidden_size if main and "hidden_states" in bundle.graph.outputs else 0
        )
        self._hidden: dict[tuple[int, int], np.ndarray] = {}
        self.hidden: np.ndarray | None = None  # [rows, kept, H] of the latest forward (reused buffer)
        # The KV element type is the graph's: float32, or int8 where GroupQueryAttention keeps a
        # quantized cache (static per-channel scales inside the graph; a quarter of the bytes).
        past_type = {i.name: i.type for i in self.session.get_inputs()}[self.past_names[0]]
        self.kv_dtype = np.dtype(_KV_TYPES.get(past_type, np.float32))
        self.kv_spare = bundle.graph.kv_spare
        # The padded graph's switch (export/variants.py): the dummy query row only in forwards of
        # one row, where speculation runs and plain decoding must take the verify's kernel path;
        # batched steps run unpadded (the dummy cost ~9% of 8-stream throughput).
        self.pad_switch = PAD_INPUT in bundle.graph.inputs
        # [runtime] pad_batches: forwards of several rows padded too (greedy output independent
        # of batching), as every forward of a bundle padded before the switch is.
        self.pad_rows = self.pad_switch and options.pad_batches
        if self.kv_spare and not self.ragged and (self.pad_rows or not self.pad_switch):
            # An always-padded graph (exported before the switch) decodes 2 query rows per
            # sequence, and GroupQueryAttention without query_seqlens refuses S > 1 over a past
            # for more than one row: such a graph runs one sequence at a time (its ragged graph,
            # onnxruntime >= 1.32, batches; a graph with the switch batches unpadded).
            self.batches = False
            if options.max_batch > 1:
                log.warning(
                    "%s pads its attention ([fuse] pad_query_row) and %s has no query_seqlens input:"
                    " one sequence at a time (max_batch %d not used); batching needs the bundle's"
                    " ragged graph (onnxruntime >= 1.32), or [runtime] pad_batches = false on a bundle"
                    " exported by edge-llm >= 0.3.0",
                    bundle.path.name, self.graph_name, options.max_batch,
                )  # fmt: skip

    def empty(self, batch: int = 1, capacity: int | None = None) -> SharedCache:
        cap = min(capacity or self.max_context, self.max_context)
        # A padded graph (kv_spare 1) writes its dummy row's KV at length + S: one position past
        # what a sequence may fill, so `length + S + kv_spare` must fit the buffer.
        shape = (batch, self.kv_shape[0], cap + self.kv_spare, self.kv_shape[1])
        buffers = [lazy_zeros(shape, self.kv_dtype) for _ in self.past_names]
        return SharedCache(buffers, np.zeros(batch, np.int64), cap)

    def forward(self, tokens: np.ndarray, cache: SharedCache, all_logits: bool = False) -> np.ndarray:
        """Append tokens [B, S] to every row of `cache`; logits [B, V] (or [B, S, V])."""
        return self.forward_rows(tokens, cache, 0, all_logits=all_logits)

    def forward_rows(
        self,
        tokens: np.ndarray,
        cache: SharedCache,
        first: int,
        advance: np.ndarray | None = None,
        all_logits: bool = False,
        counts: np.ndarray | None = None,
    ) -> np.ndarray:
        """Append tokens [b, S] to rows first..first+b-1; rows with advance[i] False are idle:
        they run a dummy token whose KV lands past their length and is never read.

        `counts` gives each row's real token count; the rest of its S is right padding, and
        "last"/"tail" logits are its own last real token. Over a past only on the ragged graph
        (`self.ragged`); the portable one reads counts only for empty rows (first prompts)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        rows, steps = tokens.shape
        if all_logits and self.logits_kind == "last":
            raise BundleError(f"{self.bundle.graph_path}: graph returns last-position logits only")
        lengths = cache.lengths[first : first + rows]
        over_past = bool(lengths.any()) and not self.ragged
        if counts is not None and (over_past or all_logits or not 1 <= counts.min() <= counts.max() <= steps):
            # Without query_seqlens GQA reads ragged counts only for empty rows (its first
            # prompt); over a past the padding would land at the wrong positions.
            raise ValueError(
                "ragged rows (counts) need 1..S tokens each, last-token logits and (without the "
                "query_seqlens graph) empty rows"
            )
        if int(lengths.max()) + steps + self.kv_spare > cache.buffers[0].shape[2]:
            raise ContextLengthError(
                f"context full: {int(lengths.max())} cached + {steps} new tokens > {cache.capacity}"
            )
        total = lengths + (steps if counts is None else counts)
        width = int(total.max())
        mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)
        kept = steps if self.logits_kind == "all" or (all_logits and self.logits_kind == "tail") else 1
        key = (rows, kept)
        logits = self._logits.get(key)
        if logits is None:
            logits = self._logits[key] = np.empty((*key, self.vocab), np.float32)
        binding = cache.bindings.get((first, *key))
        if binding is None:
            binding = cache.bindings[(first, *key)] = self._bind_kv(cache, first, rows, logits)
        if self.hidden_size:
            self.hidden = self._hidden[key]
        # Only these change from step to step; the KV views and logits stay bound.
        binding.bind_cpu_input("input_ids", tokens)
        binding.bind_cpu_input("attention_mask", mask)
        if self.logits_kind == "tail":
            binding.bind_cpu_input("logits_to_keep", np.array(steps if all_logits else 1, dtype=np.int64))
        if self.ragged:
            news = np.full(rows, steps, np.int32) if counts is None else counts.astype(np.int32)
            binding.bind_cpu_input("query_seqlens", news)
        if self.pad_switch:
            binding.bind_cpu_input(PAD_INPUT, np.array(int(rows == 1 or self.pad_rows), np.int32))
        self.session.run_with_iobinding(binding)
        self.profiled()
        cache.lengths[first : first + rows] = total if advance is None else np.where(advance, total, lengths)
        if all_logits:
            return logits.copy()
        if counts is not None and self.logits_kind == "all":
            return logits[np.arange(rows), counts - 1].copy()
        return logits[:, -1, :].copy()

    def _bind_kv(self, cache: SharedCache, first: int, rows: int, logits: np.ndarray) -> ort.IOBinding:
        """A binding of rows first..first+rows-1 of the KV buffers (as past and present) and of
        the logits buffer; kept on the cache, whose buffers never move, and reused every step
        (binding 2 x layers tensors per token cost about as much as the sampling step)."""
        binding = self.session.io_binding()
        for past, present, buf in zip(self.past_names, self.present_names, cache.buffers, strict=True):
            view = buf[first : first + rows]  # whole rows of a C-contiguous buffer: contiguous
            shape = list(view.shape)
            binding.bind_input(past, "cpu", 0, view.dtype, shape, view.ctypes.data)
            binding.bind_output(present, "cpu", 0, view.dtype, shape, view.ctypes.data)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if self.hidden_size:
            key = logits.shape[:2]
            hidden = self._hidden.get(key)
            if hidden is None:
                hidden = self._hidden[key] = np.empty((*key, self.hidden_size), np.float32)
            binding.bind_output("hidden_states", "cpu", 0, np.float32, list(hidden.shape), hidden.ctypes.data)
        return binding

    def truncate(self, cache: SharedCache, length: int, row: int = 0) -> None:
        cache.lengths[row] = min(int(cache.lengths[row]), length)

    def fork(self, cache: SharedCache) -> SharedCache:
        """An independent single-row copy of row 0 (e.g. a shared system-prompt prefix)."""
        copy = self.empty(1, cache.capacity)
        copy.copy_row(0, cache, 0)
        return copy


@dataclass
class StaticCache:
    """One row of fixed-size KV buffers [1, kv_heads, P, head_dim]; positions >= `lengths[0]` are
    masked out, so dropping tokens is just lowering the length."""

    buffers: list[np.ndarray]
    lengths: np.ndarray

    @property
    def batch(self) -> int:
        return 1


class StaticRunner(_SessionRunner):
    """Runs fixed-shape graphs: `bundle.graph.file` decodes one token, `prefill_file` a chunk of
    `prefill_length` (right-padded); both attend over a past of exactly `past_length` positions."""

    def __init__(self, bundle: Bundle, options: RunnerOptions) -> None:
        super().__init__(bundle, options)
        g = bundle.graph
        if not g.prefill_file or g.past_length < 1 or g.prefill_length < 2:
            raise BundleError(
                f"{bundle.path}: a static graph needs prefill_file, past_length and prefill_length"
            )
        self.past_length = g.past_length
        self.chunk = g.prefill_length
        self.max_context = min(self.max_context, self.past_length)
        self.pad_id = bundle.tokenizer.pad_id
        self.prefill = self.open_session(self.graph_file(g.prefill_file), profile=False)

    def empty(self, batch: int = 1) -> StaticCache:
        if batch != 1:
            raise BundleError(f"{self.bundle.path}: static graphs run one sequence at a time")
        shape = (1, self.kv_shape[0], self.past_length, self.kv_shape[1])
        return StaticCache([lazy_zeros(shape) for _ in self.past_names], np.zeros(1, np.int64))

    def forward(self, tokens: np.ndarray, cache: StaticCache, all_logits: bool = False) -> np.ndarray:
        """Feed tokens [1, S] after `cache`: prefill chunks while 2+ remain, decode for a last
        single token; logits [1, V] (last position) or [1, S, V]."""
        steps = tokens.shape[1]
        self.check_room(int(cache.lengths[0]), steps)
        parts, done = [], 0
        while done < steps:
            take = 1 if steps - done == 1 else min(self.chunk, steps - done)
            parts.append(self._run(tokens[:, done : done + take], cache))
            done += take
        if all_logits:
            return np.concatenate(parts, axis=1)
        return parts[-1][:, -1, :].copy()

    def _run(self, tokens: np.ndarray, cache: StaticCache) -> np.ndarray:
        """One call of the graph whose width fits `tokens`; returns the real positions' logits."""
        take = tokens.shape[1]
        session, width = (self.session, 1) if take == 1 else (self.prefill, self.chunk)
        have, past = int(cache.lengths[0]), self.past_length
        ids = np.full((1, width), self.pad_id, np.int64)
        ids[0, :take] = tokens[0]
        mask = np.zeros((1, past + width), np.int64)
        mask[0, :have] = 1
        mask[0, past : past + take] = 1  # padding columns stay 0: no real token attends to them
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (have + np.arange(width, dtype=np.int64))[None, :],
        }
        feeds.update(zip(self.past_names, cache.buffers, strict=True))
        logits, *presents = session.run(["logits", *self.present_names], feeds)
        if session is self.session:
            self.profiled()
        for buf, new in zip(cache.buffers, presents, strict=True):
            buf[:, :, have : have + take] = new[:, :, :take]
        cache.lengths[0] = have + take
        return logits[:, :take]

    def truncate(self, cache: StaticCache, length: int, row: int = 0) -> None:
        cache.lengths[0] = min(int(cache.lengths[0]), length)

    def fork(self, cache: StaticCache) -> StaticCache:
        return StaticCache([b.copy() for b in cache.buffers], cache.lengths.copy())


def make_runner(bundle: Bundle, options: RunnerOptions) -> ConcatRunner | SharedRunner | StaticRunner:
    if bundle.graph.kv_layout == "concat":
        return ConcatRunner(bundle, options)
    if bundle.graph.kv_layout == "static":
        return StaticRunner(bundle, options)
    return SharedRunner(bundle, options)
