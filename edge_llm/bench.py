"""Speed and memory of this runtime on one bundle, measured the way the peers are measured.

In: a bundle folder, prompt token ids ({"short": ~21 ids, "long": ~500 ids}) and settings.
Out: one JSON-able dict — decode tok/s (128 new tokens, greedy, EOS ignored), time to first
token at each prompt length, bundle load to first token, peak RSS, and aggregate throughput with
1/2/4/8 concurrent requests through the scheduler (continuous batching on fused bundles) — each
a median of `runs`, with the settings and versions used. Definitions match
`benchmarks/peers.py` so ratios against llama.cpp / onnxruntime-genai / transformers are fair.

Public, for the scripts in benchmarks/ (compare.py, serve_load.py): `prompts`, `measure`,
`timed_generation` (one greedy request: TTFT and total time) and `concurrent_throughput` (N
requests at once through a fresh scheduler).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The chat prompts whose greedy decode is timed (issue 17: "a chat prompt ... the same on two
# more"), as SmolLM2's ChatML user turns with no system turn. The first is the short prompt every
# table since 2026-11-25 used (21 tokens); the others are speculation.py's other two chats.
CHATS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator keeps food cold.",
    "What are three tips for staying focused while studying?",
)


def chat_prompt(content: str) -> str:
    """One ChatML user turn, ready for the assistant's answer."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


SHORT_PROMPT = chat_prompt(CHATS[0])
LONG_FILLER = (
    "The quick brown fox jumps over the lazy dog while the committee debates the history of the "
    "old harbour town and its fishing fleet. "
)

DEFAULTS: dict[str, Any] = {
    "runs": 5,
    "warmup": 1,
    "new_tokens": 128,
    "threads": 2,
    "batch_sizes": [1, 2, 4, 8],
    "prompt_lookup": 0,
    "provider": "cpu",
    "provider_options": {},  # over the bundle's own (bundle.json provider_options)
}


def prompts(
    engine: Any, long_tokens: int = 500, text_file: Path | None = None, chats: int = 1
) -> dict[str, list[int]]:
    """The benchmark prompts as token ids, from the engine's tokenizer (`prompts_from`)."""
    return prompts_from(engine.tokenizer, long_tokens, text_file, chats)


def prompts_from(
    tokenizer: Any, long_tokens: int = 500, text_file: Path | None = None, chats: int = 1
) -> dict[str, list[int]]:
    """A chat prompt ("short"), `long_tokens` ids of text ("long"), and with `chats` > 1 the next
    chat prompts of CHATS as "chat2", "chat3"."""
    if not 1 <= chats <= len(CHATS):
        raise ValueError(f"chats must be 1..{len(CHATS)}, not {chats}")
    short = tokenizer.encode(SHORT_PROMPT)
    extra = {f"chat{i + 1}": tokenizer.encode(chat_prompt(CHATS[i])) for i in range(1, chats)}
    body = (
        text_file.read_text(encoding="utf-8")[:20_000]
        if text_file and text_file.is_file()
        else LONG_FILLER * 60
    )
    long_ids = tokenizer.encode(body)[:long_tokens]
    if len(long_ids) < long_tokens:
        raise ValueError(f"long-prompt text too short: {len(long_ids)} < {long_tokens} tokens")
    return {"short": short, "long": long_ids, **extra}


def chat_keys(prompt_ids: dict[str, Any]) -> list[str]:
    """The prompts whose decode is timed: "short" (the first chat) and any "chatN"."""
    return ["short", *sorted(k for k in prompt_ids if k.startswith("chat"))]


def peak_rss_mib() -> float:
    """This process's high-water RSS. VmHWM belongs to the address space, which exec replaces;
    getrusage's ru_maxrss survives exec on Linux, so a worker started by a big parent would
    report the parent's peak instead of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_generation(engine: Any, ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
    """(ttft_s, total_s, generated ids) for one greedy request through the engine loop."""
    from edge_llm.sampling import SamplingParams

    t0 = time.perf_counter()
    gen = engine.start(ids, SamplingParams(max_tokens=n_new, ignore_eos=True))
    ttft = time.perf_counter() - t0
    while not gen.finished:
        engine.step([gen])
    return ttft, time.perf_counter() - t0, gen.generated


# One greedy request: (ids, new tokens) -> (ttft_s, total_s, generated ids).
Generate = Callable[[list[int], int], tuple[float, float, list[int]]]


def time_chats(
    generate: Generate,
    ids: dict[str, list[int]],
    n_new: int,
    runs: int,
    warmup: int,
    timed: Generate | None = None,
) -> dict[str, Any]:
    """Warm up, then time greedy decode on every chat prompt (`chat_keys`; interleaved, so a shared
    host's drift hits each alike) and the time to first token of the long prompt: the loop this
    runtime's bench and every peer's worker (benchmarks/peers_worker.py) share. `timed` (default
    `generate`) runs the timed requests: a peer's waits for an idle host and CPU-time count.
    Returns the result fields both report: medians, each run, the last run's ids per prompt."""
    timed = timed or generate
    keys = chat_keys(ids)
    for _ in range(warmup):
        for key in keys:
            generate(ids[key], n_new)
        generate(ids["long"], 1)
    ttft_short, e2e = [], []
    decode: dict[str, list[float]] = {key: [] for key in keys}
    out_ids: dict[str, list[int]] = {}
    for _ in range(runs):
        for key in keys:
            ttft, total, toks = timed(ids[key], n_new)
            decode[key].append((n_new - 1) / (total - ttft))
            out_ids[key] = [int(t) for t in toks]
            if key == "short":
                ttft_short.append(ttft * 1e3)
                e2e.append(n_new / total)
    ttft_long = [timed(ids["long"], 1)[0] * 1e3 for _ in range(runs)]
    return {
        "decode_tok_s": statistics.median(decode["short"]),
        "decode_tok_s_best": max(decode["short"]),
        # every timed chat prompt ("short" is the first): median tok/s, each run, the ids of the
        # last run (the bench decodes them to check the systems answer alike)
        "decode_tok_s_by_prompt": {k: statistics.median(v) for k, v in decode.items()},
        "decode_tok_s_runs_by_prompt": decode,
        "output_ids_by_prompt": out_ids,
        "e2e_tok_s": statistics.median(e2e),
        "ttft_short_ms": statistics.median(ttft_short),
        "ttft_long_ms": statistics.median(ttft_long),
        "decode_tok_s_runs": decode["short"],
        "ttft_short_ms_runs": ttft_short,
        "ttft_long_ms_runs": ttft_long,
    }


def concurrent_throughput(engine: Any, ids: list[int], clients: int, n_new: int, tag: str) -> float:
    """Aggregate tok/s of `clients` requests submitted at once to a fresh scheduler."""
    from edge_llm.protocol import Request
    from edge_llm.scheduler import Scheduler

    # Requests carry text: keep the chat markers, and check that it encodes back to the same ids
    # (decoding without them once turned the 21-token chat prompt into 18 tokens of plain text).
    text = engine.tokenizer.decode(ids, skip_special=False)
    if engine.tokenizer.encode(text) != list(ids):
        raise ValueError("the benchmark prompt does not survive a round trip through text")
    sched = Scheduler(engine, max_queue=clients, max_inflight_per_client=clients, max_batch=clients)
    done = threading.Semaphore(0)
    for i in range(clients):
        request = Request(id=f"{tag}-{i}", prompt=text, max_tokens=n_new, ignore_eos=True)
        sched.submit(request, lambda e: done.release() if e.done else None)
    t0 = time.perf_counter()
    sched.start()
    for _ in range(clients):
        done.acquire()
    elapsed = time.perf_counter() - t0
    sched.close(grace_s=1)
    return clients * n_new / elapsed


def measure(
    bundle: str | Path, prompt_ids: dict[str, list[int]] | None = None, **settings: Any
) -> dict[str, Any]:
    from edge_llm.bundle import load_bundle
    from edge_llm.engine import Engine
    from edge_llm.runner import RunnerOptions

    s = {**DEFAULTS, **settings}
    n_new, runs = int(s["new_tokens"]), int(s["runs"])
    sizes = [int(b) for b in s["batch_sizes"]]
    t0 = time.perf_counter()
    b = load_bundle(bundle)
    lookup = int(s["prompt_lookup"])
    from edge_llm.providers import ProviderSpec

    provider = str(s["provider"])
    options = RunnerOptions(
        providers=(ProviderSpec(provider, dict(s["provider_options"])),),
        threads=int(s["threads"]),
        max_batch=1,
        prompt_lookup=lookup,
    )
    # Batch-1 figures come from a single-stream engine, the one `generate` and `chat` run (one
    # KV row: the portable graph, 1.10-1.17x the query_seqlens graph's batch-1 decode on ORT
    # 1.32); the concurrent rows from an engine with max(sizes) rows, as `serve` loads.
    engine = Engine(b, options)
    ids = prompt_ids or prompts(engine)
    ttft0, _, _ = timed_generation(engine, ids["short"], 1)
    load_to_first = time.perf_counter() - t0
    chats = time_chats(lambda p, n: timed_generation(engine, p, n), ids, n_new, runs, int(s["warmup"]))
    peak = peak_rss_mib()
    decode_graph = engine.runner.graph_name
    applied = engine.runner.plan.provider_options[0]
    if max(sizes, default=1) > 1:
        del engine  # its KV and session go before the batching engine's come
        engine = Engine(b, dataclasses.replace(options, max_batch=max(sizes)))
    for size in sizes:
        concurrent_throughput(engine, ids["short"], size, n_new, f"warm{size}")
    # Rounds interleave the sizes so that a shared host's slow drift (+-10% between minutes
    # here) hits every size alike; the 8-vs-1 speedup is the median of each round's own ratio.
    batch_runs: dict[str, list[float]] = {str(size): [] for size in sizes}
    for r in range(runs):
        for size in sizes:
            tok_s = concurrent_throughput(engine, ids["short"], size, n_new, f"b{size}-{r}")
            batch_runs[str(size)].append(tok_s)
    batch = {k: statistics.median(v) for k, v in batch_runs.items()}
    speedup = (
        statistics.median(a / b for a, b in zip(batch_runs["8"], batch_runs["1"], strict=True))
        if {"1", "8"} <= batch.keys()
        else None
    )
    arch = b.architecture
    quant = b.quantization.get("mode", b.quantization.get("method"))
    kv_bytes_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4
    import numpy
    import onnxruntime

    from edge_llm.bandwidth import weight_bytes_per_token

    return {
        "system": "edge-llm"
        + (f"+lookup{lookup}" if lookup else "")
        + (f"+{provider}" if provider != "cpu" else ""),
        "label": f"edge-llm ({b.graph.kv_layout} KV, {quant}"
        + (f", {provider}" if provider != "cpu" else "")
        + "".join(f" {k}={v}" for k, v in applied.items())
        + (f", prompt lookup {lookup})" if lookup else ")"),
        "provider": engine.runner.session.get_providers()[0],
        # what the session was given (the bundle's options under the row's own), in ORT's names
        "provider_options": applied,
        "skipped": None,
        "bundle": str(b.path),
        "bundle_bytes": b.size_bytes(),
        "kv_bytes_per_token": kv_bytes_per_token,
        # what one batch-1 decode step streams: the limit columns divide by the machine's bandwidth
        "weight_bytes_per_token": weight_bytes_per_token(b.graph_path)["bytes"],
        **chats,
        "decode_graph": decode_graph,
        "batch_graph": engine.runner.graph_name if sizes else None,
        "first_token_after_load_s": load_to_first,
        "ttft_cold_ms": ttft0 * 1e3,
        "prompt_tokens": {"short": len(ids["short"]), "long": len(ids["long"])},
        "new_tokens": n_new,
        "runs": runs,
        "peak_rss_mib": peak,
        "peak_rss_with_batch_mib": peak_rss_mib(),
        "batch_tok_s_by_size": batch,
        "batch_runs": batch_runs,
        "batch_speedup_8": speedup,
        "first_ids": chats["output_ids_by_prompt"]["short"][:16],
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "loadavg_1min_start": os.getloadavg()[0],
        "cpu": cpu_info(),
        "settings": s,
    }


def cpu_info() -> dict[str, Any]:
    """The CPU model and the vector extensions that decide which int8 kernels run: the same
    bundle measured 134 tok/s on an AVX-512 host and 94 on an AVX2-only one (2026-11-25)."""
    info: dict[str, Any] = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "model" not in info:
            info["model"] = value.strip()
        elif key.strip() == "flags" and "isa" not in info:
            wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "fma")
            flags = set(value.split())
            info["isa"] = [f for f in wanted if f in flags]
    return info
