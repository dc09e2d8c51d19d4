"""The memory budget: from `[runtime] memory_mb` to batch rows, context length and live sessions.

In: a `Bundle` (its manifest: architecture, KV layout, file sizes), a `BoardConfig` (its
`[runtime]` and `[sessions]` limits, which stay upper bounds) and a budget in MB (MiB, 2**20
bytes). Out: a `MemoryPlan` — what each part of the process costs and the rows / context /
sessions / prefill piece that keep the sum inside the budget — or a `ConfigError` naming the
smallest budget that works. No graph is loaded: the plan comes from the manifest alone, so
`edge-llm doctor` can print it and `serve` can refuse a budget before it spends a second loading.

What costs memory, measured (benchmarks/memory_costs.py, results/memory_costs.md; x86-64,
onnxruntime 1.32, SmolLM2-135M INT8 fused bundle, RSS from /proc/self/status):
- the process baseline: Python + numpy + onnxruntime + tokenizers + the serving modules + paho;
- the tokenizer, proportional to tokenizer.json (the `tokenizers` vocabulary and merges);
- the weights as ORT holds them after session creation, proportional to the graph files, plus a
  transient while loading (the start-up peak);
- the KV cache: layers x 2 x kv_heads x head_dim x 4 bytes per token per row (1 byte with an
  int8 KV cache: `[runtime] kv_cache`, or the bundle's main graph when "auto"). Shared-layout
  buffers are anonymous mmap committed page by page as positions are written and never given
  back, so a batch row or a live session costs, at worst, its full context;
- ORT's workspace for one forward, which its arena keeps at the largest ever needed: it grows
  with the tokens fed at once times the context they attend to. A budget therefore feeds prompts
  in pieces (`prefill_chunk`);
- the runner's logits buffers (one [rows, vocab] float32 per batch width used);
- structured output, where llguidance (extra `structured`) is installed so a request may ask
  for JSON: the engine builds llguidance's view of the tokenizer on the first such request and
  keeps it, proportional to tokenizer.json, plus its import and a compiled schema.
Other boards, providers and onnxruntime builds differ; the headroom covers the rest (SQLite,
sockets, Python objects, allocator slack) and the soak (`benchmarks/soak.py`) checks the sum.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

from edge_llm.board import BoardConfig
from edge_llm.bundle import Bundle
from edge_llm.errors import ConfigError

MIB = 2**20

# Measured by benchmarks/memory_costs.py (see the module docstring); MiB unless named otherwise.
# Two runs (2026-12-01) agreed within 1 MiB except the workspace; each constant bounds both.
BASELINE_MB = 65.0  # imports: 57.1 (engine) + 5.2 (server, socket) + 1.9 (paho) = 64.2
TOKENIZER_PER_FILE = 8.9  # RSS per byte of tokenizer.json: +28.7 / +29.5 MiB for 3.36 MiB
WEIGHTS_PER_FILE = 1.02  # RSS per byte of graph files after session creation: 169.2 / 166.1 MiB
LOAD_TRANSIENT = 0.17  # extra peak while ORT loads, per byte of graph files: 26.8 / 166.1 MiB
# Workspace kept by ORT's arena after feeding C tokens over a context of T positions, an upper
# bound of every measured point (C, T -> MiB, higher of two runs: 16,16 -> 6.7; 256,256 -> 31.1;
# 256,2000 -> 47.3; 512,512 -> 50.8; 512,2000 -> 63.6; 2000,2000 -> 143.4): a + b*C + c*C*T,
# with b scaled by the hidden size and c by the attention heads of the measured model (576, 9).
WORKSPACE_FIXED_MB = 5.5
WORKSPACE_PER_TOKEN_MB = 0.093 / 576  # per token fed, per unit of hidden size
WORKSPACE_PER_TOKEN_POSITION_MB = 3.7e-5 / 9  # per token fed x context position, per head
PAGE = 4096  # KV buffers commit whole pages of each (layer, K/V, head) region

# llguidance: import, LLTokenizer, one json_object constraint's first mask. benchmarks/
# memory_costs.py ("structured" step, after the bundle's tokenizer and session; results/
# memory_costs_structured.md): SmolLM2 (3.36 MiB tokenizer.json) 4.0 + 52.6 + 1.0 = 57.6 MiB
# (57.8 again); with only the engine imported before it 4.8 + 60.4 + 1.0 = 66.2; the tests' tiny
# tokenizer (13 KB) 4.3 + 2.6 + 2.3. A fixed part and a part per byte above all of them.
STRUCTURED_FIXED_MB = 9.5
STRUCTURED_PER_FILE = 17.3

BUDGET_PREFILL_CHUNK = 256  # prompt piece under a budget: 47 MiB of workspace vs 143 whole (T=2000)
MIN_CONTEXT = 256  # a budget never plans a shorter context than this (or the bundle's, if shorter)
HEADROOM_MIN_MB = 16.0
HEADROOM_SHARE = 0.05


@dataclass(frozen=True)
class MemoryPlan:
    """What the process will hold, in MiB, and the limits that keep it there."""

    bundle: str
    budget_mb: int  # 0: no budget (the plan shows what the configured limits need)
    baseline_mb: float
    tokenizer_mb: float
    weights_mb: float
    load_peak_mb: float  # baseline + tokenizer + weights + ORT's loading transient
    workspace_mb: float
    logits_mb: float
    headroom_mb: float
    structured_mb: float  # llguidance, when installed (0 without): see the module docstring
    kv_token_kib: float  # one token of one row, all layers, K and V
    kv_row_mb: float  # one row (or one live session) at the planned context, page-rounded
    rows: int  # batch KV cache rows (concurrent sequences)
    context: int  # tokens per sequence, prompt + answer
    sessions: int  # live session KV caches kept in memory
    prefill_chunk: int  # 0: prompts fed whole
    kv_copies: int = 1  # concat layout: past and present both live during a forward

    @property
    def kv_mb(self) -> float:
        return (self.rows * self.kv_copies + self.sessions) * self.kv_row_mb

    @property
    def fixed_mb(self) -> float:
        """Everything but the KV cache, once serving."""
        parts = (self.baseline_mb, self.tokenizer_mb, self.weights_mb, self.workspace_mb, self.logits_mb)
        return sum(parts) + self.structured_mb + self.headroom_mb

    @property
    def total_mb(self) -> float:
        return max(self.fixed_mb + self.kv_mb, self.load_peak_mb + self.headroom_mb)

    def apply(self, board: BoardConfig) -> BoardConfig:
        """`board` with the planned rows, context, prefill piece and live sessions."""
        runtime = dataclasses.replace(
            board.runtime,
            max_batch=self.rows,
            max_context=self.context,
            prefill_chunk=self.prefill_chunk,
            memory_mb=self.budget_mb,
        )
        sessions = dataclasses.replace(board.sessions, max_live=self.sessions)
        return dataclasses.replace(board, runtime=runtime, sessions=sessions)

    def summary(self) -> str:
        """One line for the serve log."""
        budget = f"{self.budget_mb} MB budget" if self.budget_mb else "no budget"
        return (
            f"memory plan ({budget}): {self.total_mb:.0f} MB = weights {self.weights_mb:.0f} + "
            f"{self.rows} rows and {self.sessions} sessions x {self.kv_row_mb:.1f} MB of KV at "
            f"{self.context} tokens + baseline, tokenizer, workspace and headroom "
            f"{self.fixed_mb - self.weights_mb:.0f}"
        )

    def lines(self) -> list[str]:
        """The plan as a small table (`edge-llm doctor`)."""
        piece = f"{self.prefill_chunk}-token pieces" if self.prefill_chunk else "whole prompts"
        kv = f"{self.rows} rows" + (" x 2 (past + present)" if self.kv_copies > 1 else "")
        rows = [
            ("baseline (python, onnxruntime, tokenizers, server)", self.baseline_mb),
            ("tokenizer", self.tokenizer_mb),
            ("weights (as onnxruntime holds them)", self.weights_mb),
            (f"prefill workspace ({piece} over {self.context} tokens)", self.workspace_mb),
            ("logits buffers", self.logits_mb),
            ("structured output (llguidance, built on the first JSON request)", self.structured_mb),
            (f"KV cache: {kv} x {self.kv_row_mb:.1f} MB", self.rows * self.kv_copies * self.kv_row_mb),
            (f"live sessions: {self.sessions} x {self.kv_row_mb:.1f} MB", self.sessions * self.kv_row_mb),
            ("headroom", self.headroom_mb),
            ("total", self.total_mb),
        ]
        budget = f"budget {self.budget_mb} MB" if self.budget_mb else "no budget: what the limits need"
        out = [
            f"memory plan for {self.bundle} ({budget}; MB = MiB)",
            f"  context {self.context} tokens, {self.rows} batch rows, {self.sessions} live sessions;"
            f" KV {self.kv_token_kib:.1f} KiB per token per row",
        ]
        out += [f"  {label:<58} {value:8.1f}" for label, value in rows]
        out.append(f"  start-up peak (loading the graph)                          {self.load_peak_mb:8.1f}")
        return out


def plan_memory(
    bundle: Bundle,
    board: BoardConfig,
    memory_mb: int | None = None,
    *,
    min_context: int = MIN_CONTEXT,
    structured: bool | None = None,
) -> MemoryPlan:
    """Size rows, context and live sessions to fit `memory_mb` (default: the board's
    `[runtime] memory_mb`; 0: no budget, the plan shows what the configured limits need).
    `structured`: count llguidance (default: whether it is installed, i.e. whether a request
    can ask for JSON).

    Policy, in order: the longest context (the configured one, halved down to `min_context`) at
    which two batch rows fit (one when max_batch is 1, or at the shortest context); then live
    sessions up to `[sessions] max_live`, each costed at a full context; then more rows up to
    max_batch with what is left. Raises ConfigError with the smallest budget that works.
    """
    budget = board.runtime.memory_mb if memory_mb is None else memory_mb
    if budget < 0:
        raise ConfigError(f"memory_mb must be ≥ 0, got {budget}")
    if structured is None:
        structured = importlib.util.find_spec("llguidance") is not None
    if not budget:
        r = board.runtime
        ctx = _context_limit(bundle, board)
        rows, sessions = _max_rows(bundle, board), board.sessions.max_live
        return _plan(bundle, 0, ctx, rows, sessions, r.prefill_chunk, kv_bytes(bundle, board), structured)
    plan = _fit(bundle, board, budget, min_context, structured)
    if plan is not None:
        return plan
    low, high = budget, max(2 * budget, 64)
    while _fit(bundle, board, high, min_context, structured) is None:
        low, high = high, 2 * high
    while high - low > 1:  # the smallest budget that fits: more budget never fits less
        mid = (low + high) // 2
        fits = _fit(bundle, board, mid, min_context, structured) is not None
        low, high = (low, mid) if fits else (mid, high)
    smallest = _fit(bundle, board, high, min_context, structured)
    assert smallest is not None
    raise ConfigError(
        f"memory_mb = {budget} is too small for {bundle.name}: the smallest budget that works is "
        f"{high} MB (weights {smallest.weights_mb:.0f} MB, baseline and tokenizer "
        f"{smallest.baseline_mb + smallest.tokenizer_mb:.0f} MB, one row of {smallest.context} "
        f"tokens {smallest.kv_row_mb:.0f} MB{_structured_note(smallest)}; "
        f"`edge-llm doctor --bundle ... --memory-mb N` shows the plan)"
    )


def _structured_note(plan: MemoryPlan) -> str:
    if not plan.structured_mb:
        return ""
    mb = plan.structured_mb
    return f", structured output {mb:.0f} MB (llguidance is installed: without it, that much less)"


def _fit(
    bundle: Bundle, board: BoardConfig, budget: int, min_context: int, structured: bool
) -> MemoryPlan | None:
    max_rows, max_sessions = _max_rows(bundle, board), board.sessions.max_live
    kv_item = kv_bytes(bundle, board)  # bytes per cached element: the same at every context tried
    longest = _context_limit(bundle, board)
    floor = min(min_context, longest)
    ctx = longest
    while True:
        chunk = min(board.runtime.prefill_chunk or BUDGET_PREFILL_CHUNK, ctx)
        probe = _plan(bundle, budget, ctx, 0, 0, chunk, kv_item, structured, logits_rows=max_rows)
        copies = probe.kv_copies
        # KV exists only after loading, so the start-up peak is a separate check.
        slots = int((budget - probe.fixed_mb) // probe.kv_row_mb)
        want = min(max_rows, 2)
        if probe.load_peak_mb + probe.headroom_mb <= budget and (
            slots >= want * copies or (ctx == floor and slots >= copies)
        ):
            rows = min(want, slots // copies)
            sessions = min(max_sessions, slots - rows * copies)
            rows = min(max_rows, rows + (slots - rows * copies - sessions) // copies)
            plan = _plan(bundle, budget, ctx, rows, sessions, chunk, kv_item, structured)
            return plan if plan.total_mb <= budget else None
        if ctx <= floor:
            return None
        ctx = max(floor, ctx // 2)


def _plan(
    bundle: Bundle,
    budget: int,
    context: int,
    rows: int,
    sessions: int,
    chunk: int,
    kv_item: int = 4,
    structured: bool = False,
    logits_rows: int | None = None,
) -> MemoryPlan:
    arch, graph = bundle.architecture, bundle.graph
    graphs = tuple(f for f in (graph.file, graph.prefill_file) if f)  # + external data files
    graph_bytes = sum(int(meta["bytes"]) for name, meta in bundle.files.items() if name.startswith(graphs))
    tokenizer_bytes = int(bundle.files.get(bundle.tokenizer.file, {}).get("bytes", 0))
    weights = WEIGHTS_PER_FILE * graph_bytes / MIB
    tokenizer = TOKENIZER_PER_FILE * tokenizer_bytes / MIB
    regions = arch.num_layers * 2 * arch.num_kv_heads  # one (layer, K/V, head) strip each
    token_bytes = regions * arch.head_dim * kv_item
    strip = math.ceil(context * arch.head_dim * kv_item / PAGE) * PAGE
    fed = chunk or context
    workspace = (
        WORKSPACE_FIXED_MB
        + WORKSPACE_PER_TOKEN_MB * arch.hidden_size * fed
        + WORKSPACE_PER_TOKEN_POSITION_MB * arch.num_heads * fed * context
    )
    if graph.logits == "all":  # every fed position comes back as a row of logits
        workspace += fed * arch.vocab_size * 4 / MIB
    width = rows if logits_rows is None else logits_rows
    logits = width * (width + 1) / 2 * arch.vocab_size * 4 / MIB  # one buffer per batch width
    return MemoryPlan(
        bundle=bundle.name,
        budget_mb=budget,
        baseline_mb=BASELINE_MB,
        tokenizer_mb=tokenizer,
        weights_mb=weights,
        load_peak_mb=BASELINE_MB + tokenizer + weights + LOAD_TRANSIENT * graph_bytes / MIB,
        workspace_mb=workspace,
        logits_mb=logits,
        headroom_mb=max(HEADROOM_MIN_MB, HEADROOM_SHARE * budget),
        structured_mb=(STRUCTURED_FIXED_MB + STRUCTURED_PER_FILE * tokenizer_bytes / MIB) * structured,
        kv_token_kib=token_bytes / 1024,
        kv_row_mb=regions * strip / MIB,
        rows=rows,
        context=context,
        sessions=sessions,
        prefill_chunk=chunk,
        kv_copies=2 if graph.kv_layout == "concat" else 1,
    )


def kv_bytes(bundle: Bundle, board: BoardConfig) -> int:
    """Bytes per cached element: 1 for an int8 KV cache (the board's choice, else the bundle's
    main graph; the runner refuses a choice the bundle has no graph for), else 4."""
    kind = board.runtime.kv_cache if board.runtime.kv_cache != "auto" else bundle.graph.kv_cache
    return 1 if kind == "int8" and bundle.graph.kv_layout == "shared" else 4


def _context_limit(bundle: Bundle, board: BoardConfig) -> int:
    ctx = bundle.architecture.context_length
    if board.runtime.max_context:
        ctx = min(ctx, board.runtime.max_context)
    if bundle.graph.kv_layout == "static":
        ctx = min(ctx, bundle.graph.past_length)
    return ctx


def _max_rows(bundle: Bundle, board: BoardConfig) -> int:
    """Only the shared layout batches; the others run one sequence at a time."""
    return board.runtime.max_batch if bundle.graph.kv_layout == "shared" else 1
