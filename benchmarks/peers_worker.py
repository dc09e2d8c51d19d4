"""The worker side of benchmarks/peers.py: what runs *inside* a peer's interpreter.

`benchmarks/peers.py` (the parent side) locates or builds each peer's model and interpreter, then
starts `python benchmarks/peers.py worker --system S` with that interpreter; the CLI hands the
payload to `worker` here, which loads the peer, times it (`measure`) and returns one result dict.
The parent's `quantize` and `build-hf` steps also run here (`quantize_q8`, `build_hf`), in the
peer venv or whichever interpreter has torch.

Any of those interpreters (the project venv, the peer venv, with llama.cpp / ort-genai /
transformers and little else) must import this file, so nothing but the standard library is
imported at module level; each backend imports its runtime when called. The constants both sides
share (SYSTEMS, DEFAULT_SETTINGS, RESULT_MARKER) live here because the parent imports this module,
never the other way round.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSTEMS: tuple[str, ...] = ("llamacpp", "ortgenai", "transformers")

RESULT_MARKER = "PEER_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_SETTINGS: dict[str, Any] = {
    "runs": 5,  # each figure is the median of this many runs
    "warmup": 1,  # untimed runs first
    "new_tokens": 128,  # decode length, greedy, EOS ignored
    "threads": 2,
    "batch_size": 4,  # batch throughput; 0 turns it off
    "n_ctx": 1024,  # llama.cpp context
    "n_batch": 512,  # llama.cpp n_batch = n_ubatch; run_peer retries with 1 if the worker crashes
    "flash_attn": True,  # llama.cpp flash attention (+25% decode here)
    "ortgenai_precision": "int8",
    "timeout_s": 1800,
    # Before each timed run, wait up to this many seconds for the other processes on the machine
    # to use < 15% of the CPUs (0: don't wait). Runs that start anyway are counted.
    "idle_wait_s": 0,
}

Result = dict[str, Any]
Prompts = dict[str, list[int]]


# --------------------------------------------------------------------------- model building


def build_hf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def quantize_q8(src: Path, dst: Path, threads: int = 2) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


# --------------------------------------------------------------------------- worker side


def _rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "absent"
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over `interval` seconds (whoever uses them), from /proc/stat."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def _wait_idle(max_wait: float, threshold: float = 0.15) -> bool:
    """Wait (up to `max_wait` s) until the machine is idle; True if it was when we returned."""
    if max_wait <= 0:
        return True
    deadline = time.monotonic() + max_wait
    while True:
        if _cpu_busy() < threshold:
            return True
        if time.monotonic() > deadline:
            return False


def _gguf_weight_bytes(model: str) -> int:
    """Bytes of the matmul weights one llama.cpp decode step reads, from the GGUF's tensor table.

    Every tensor of 2+ dimensions (the norms are vectors) except the token embedding, which is
    only gathered (one row per token) unless it is also the output projection: with tied weights
    (no `output.weight`, SmolLM2) llama.cpp multiplies by it in full every step."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(model).tensors}
    skip = {"token_embd.weight"} if "output.weight" in tensors else set()
    return sum(
        int(t.n_bytes)
        for name, t in tensors.items()
        if name not in skip and sum(int(d) > 1 for d in t.shape) >= 2
    )


def _onnx_weight_bytes(graph: Path) -> int:
    """The ONNX graph's streamed matmul bytes, counted as for our bundles (edge_llm/bandwidth.py,
    numpy only: the peer venv has it)."""
    sys.path.insert(0, str(REPO_ROOT))
    from edge_llm.bandwidth import weight_bytes_per_token

    return int(weight_bytes_per_token(graph)["bytes"])


# A backend: generate(ids, n_new) -> (ttft_s, total_s, token ids); batch(ids, b, n_new) -> total_s.
Generate = Callable[[list[int], int], tuple[float, float, list[int]]]
Batch = Callable[[list[int], int, int], float]


def _llamacpp_backend(model: str, s: dict[str, Any]) -> tuple[Generate, Batch | None, dict, str]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=model,
        n_ctx=s["n_ctx"],
        n_threads=s["threads"],
        n_threads_batch=s["threads"],
        n_batch=s["n_batch"],
        n_ubatch=s["n_batch"],
        flash_attn=bool(s["flash_attn"]),
        seed=0,
        verbose=False,
    )

    def generate(ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        llm.reset()  # forget the previous prompt: no prefix reuse between runs
        out: list[int] = []
        t0 = time.perf_counter()
        ttft = 0.0
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not out:
                ttft = time.perf_counter() - t0
            out.append(int(tok))
            if len(out) >= n_new:
                break
        return ttft, time.perf_counter() - t0, out

    info = {
        "quant": "Q8_0 (requantized from Q4_1)",
        "n_batch": s["n_batch"],
        "n_ubatch": s["n_batch"],
        "n_ctx": s["n_ctx"],
        "flash_attn": bool(s["flash_attn"]),
        "sampler": "greedy (temp=0)",
        "eos": "ignored (generate() does not stop at EOS)",
        "weight_bytes_per_token": _gguf_weight_bytes(model),
    }
    note = (
        "not measured: llama-cpp-python's Llama API decodes one sequence (multi-sequence "
        "batches need its low-level llama_batch API)"
    )
    return generate, None, info, note


def _ortgenai_backend(model: str, s: dict[str, Any]) -> tuple[Generate, Batch | None, dict, str]:
    import numpy as np
    import onnxruntime_genai as og

    cfg = og.Config(model)
    cfg.clear_providers()  # CPU
    cfg.overlay(
        json.dumps(
            {
                "model": {
                    "decoder": {
                        "session_options": {"intra_op_num_threads": s["threads"], "inter_op_num_threads": 1}
                    }
                }
            }
        )
    )
    m = og.Model(cfg)

    def _gen(ids: list[int], batch: int, n_new: int) -> tuple[float, float, list[int]]:
        total_len = len(ids) + n_new
        t0 = time.perf_counter()
        params = og.GeneratorParams(m)
        # min_length = max_length: EOS is masked until the end, so exactly n_new tokens.
        params.set_search_options(
            do_sample=False, max_length=total_len, min_length=total_len, batch_size=batch
        )
        gen = og.Generator(m, params)
        gen.append_tokens(np.array([ids] * batch, dtype=np.int32))
        out: list[int] = []
        ttft = 0.0
        while not gen.is_done():
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if not out:
                ttft = time.perf_counter() - t0
            out.append(tok)
        total = time.perf_counter() - t0
        del gen
        return ttft, total, out

    def generate(ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        return _gen(ids, 1, n_new)

    def batch(ids: list[int], b: int, n_new: int) -> float:
        return _gen(ids, b, n_new)[1]

    info = {
        "precision": s["ortgenai_precision"],
        "provider": "cpu",
        "intra_op_num_threads": s["threads"],
        "sampler": "greedy (do_sample=False)",
        "eos": "masked via min_length",
        "ttft_includes": "GeneratorParams + Generator creation",
        "input": "token ids (its own tokenizer mis-reads this tokenizer.json)",
        "weight_bytes_per_token": _onnx_weight_bytes(
            Path(model)
            / json.loads((Path(model) / "genai_config.json").read_text())["model"]["decoder"]["filename"]
        ),
    }
    return generate, batch, info, ""


def _transformers_backend(model: str, s: dict[str, Any]) -> tuple[Generate, Batch | None, dict, str]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(s["threads"])
    torch.set_num_interop_threads(1)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    eos = m.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    class Stamps:
        """A generate() streamer that only records when tokens appear."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def _gen(ids: list[int], b: int, n_new: int, streamer: Stamps | None) -> Any:
        x = torch.tensor([ids] * b, dtype=torch.long)
        with torch.inference_mode():
            return m.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                streamer=streamer,
            )

    def generate(ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        st = Stamps()
        t0 = time.perf_counter()
        out = _gen(ids, 1, n_new, st)
        total = time.perf_counter() - t0
        # put() #0 is the prompt, #1 the first new token.
        ttft = st.times[1] - t0 if len(st.times) > 1 else total
        return ttft, total, [int(t) for t in out[0, len(ids) :]]

    def batch(ids: list[int], b: int, n_new: int) -> float:
        t0 = time.perf_counter()
        _gen(ids, b, n_new, None)
        return time.perf_counter() - t0

    info = {
        "dtype": "float32",
        "attn_implementation": m.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "sampler": "greedy (generate)",
        "eos": "masked via min_new_tokens",
        # every Linear's weight (lm_head shares the embedding's: counted once, as a matmul)
        "weight_bytes_per_token": sum(
            mod.weight.numel() * mod.weight.element_size()
            for mod in m.modules()
            if isinstance(mod, torch.nn.Linear)
        ),
    }
    return generate, batch, info, ""


BACKENDS = {
    "llamacpp": (_llamacpp_backend, "llama.cpp Q8_0", ("llama-cpp-python", "numpy")),
    "ortgenai": (_ortgenai_backend, "onnxruntime-genai", ("onnxruntime-genai", "onnxruntime", "numpy")),
    "transformers": (_transformers_backend, "transformers fp32", ("transformers", "torch")),
}


def measure(system: str, model: str, prompts: Prompts, settings: dict[str, Any]) -> Result:
    """Worker body (runs inside the peer's interpreter): load, warm up, time, report."""
    s = {**DEFAULT_SETTINGS, **settings}
    factory, label, dists = BACKENDS[system]
    base: Result = {
        "system": system,
        "label": label,
        "model": model,
        "versions": _versions(*dists),
        "cpu": _cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if system == "ortgenai":
        base["label"] = f"onnxruntime-genai {s['ortgenai_precision']}"
    t0 = time.perf_counter()
    try:
        generate, batch, info, batch_note = factory(model, s)
    except ImportError as exc:
        return {**base, "skipped": f"not importable: {exc}", "settings": s}
    load_s = time.perf_counter() - t0
    rss_load = _rss_mib()
    n_new, runs = int(s["new_tokens"]), int(s["runs"])
    short, long_ = prompts["short"], prompts["long"]

    # The loop this runtime's bench runs too (edge_llm/bench.py imports only the standard library
    # at module level, so the peer's interpreter can import it from the checkout).
    sys.path.insert(0, str(REPO_ROOT))
    from edge_llm.bench import peak_rss_mib, time_chats

    load_start = os.getloadavg()[0]
    busy_runs = 0
    cpu_s = wall_s = 0.0

    def gate() -> None:
        nonlocal busy_runs
        busy_runs += not _wait_idle(float(s["idle_wait_s"]))

    def timed(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        """A timed request: after waiting for an idle host, adding its process CPU time and wall
        time to the totals; a chat must give exactly n_new tokens."""
        nonlocal cpu_s, wall_s
        gate()
        c, w = time.process_time(), time.perf_counter()
        ttft, total, toks = generate(ids, n)
        cpu_s += time.process_time() - c
        wall_s += time.perf_counter() - w
        if n == n_new and len(toks) != n_new:
            raise RuntimeError(f"{system} generated {len(toks)} tokens, expected {n_new}")
        return ttft, total, toks

    chats = time_chats(generate, prompts, n_new, runs, int(s["warmup"]), timed)
    peak = peak_rss_mib()
    # Timed runs' CPU seconds / (wall seconds x threads): well below 1 means the worker's threads
    # were waiting for cores that other processes held (the figures are then pessimistic).
    cpu_util = cpu_s / max(wall_s * int(s["threads"]), 1e-9)

    b = int(s["batch_size"])
    batch_runs: list[float] = []
    if b > 1 and batch is not None:
        batch(short, b, n_new)  # warm-up at this shape
        for _ in range(runs):
            gate()
            batch_runs.append(b * n_new / batch(short, b, n_new))
    elif b > 1:
        batch_note = batch_note or "batch generation not supported"
    return {
        **base,
        "skipped": None,
        **chats,
        "prompt_tokens": {"short": len(short), "long": len(long_)},
        "new_tokens": n_new,
        "runs": runs,
        "load_s": load_s,
        "cpu_util": cpu_util,
        "runs_started_busy": busy_runs if float(s["idle_wait_s"]) > 0 else None,
        "loadavg_1min_start": load_start,
        "rss_after_load_mib": rss_load,
        "peak_rss_mib": peak,
        "peak_rss_with_batch_mib": peak_rss_mib(),
        "batch_size": b if batch_runs else None,
        "batch_tok_s": statistics.median(batch_runs) if batch_runs else None,
        "batch_note": batch_note
        or ("generated tokens / wall time incl. prefill, short prompt" if batch_runs else ""),
        "batch_tok_s_runs": batch_runs,
        "first_ids": chats["output_ids_by_prompt"]["short"][:16],
        # what one batch-1 decode step reads from this system's own model file; the bench divides
        # decode tok/s x these bytes by the machine's read bandwidth
        "weight_bytes_per_token": info.get("weight_bytes_per_token"),
        "weight_bytes_from": "own model file",
        "backend": info,
        "settings": s,
    }


def worker(system: str, payload: dict[str, Any]) -> Result:
    """Worker entry point: payload {"prompts", "settings", "model"} -> result (never raises)."""
    try:
        return measure(system, payload["model"], payload["prompts"], payload.get("settings", {}))
    except Exception as exc:  # report, don't crash: the parent records it as skipped
        return {
            "system": system,
            "skipped": f"{type(exc).__name__}: {exc}",
            "settings": payload.get("settings", {}),
        }
