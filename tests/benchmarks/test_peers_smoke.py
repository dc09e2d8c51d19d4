"""Smoke tests for benchmarks/peers.py: fast ones need no model and no peer venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402


@pytest.mark.parametrize("name", ["peers.py", "peers_worker.py"])
def test_module_imports_only_stdlib(name: str) -> None:
    # Any interpreter (project venv, peer venv) must be able to run the worker file; peers.py
    # imports peers_worker.py, which must also stand alone.
    code = (
        "import sys, runpy; before=set(sys.modules);"
        f"runpy.run_path({str(ROOT / 'benchmarks' / name)!r}, run_name='x');"
        "heavy={'numpy','torch','transformers','llama_cpp','onnxruntime_genai','tokenizers'};"
        "sys.exit(len(heavy & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_unknown_system_is_skipped() -> None:
    r = peers.run_peer("nope", {"short": [1], "long": [1]})
    assert r["skipped"] and r["system"] == "nope"


def test_absent_peer_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERS_VENV", str(tmp_path / "no-venv"))
    r = peers.run_peer("llamacpp", {"short": [1], "long": [1]}, {"cache": str(tmp_path)})
    assert "setup_peers.sh" in r["skipped"]


def test_worker_reports_failure_as_skipped() -> None:
    payload = {"prompts": {"short": [1], "long": [1]}, "settings": {}, "model": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "worker", "--system", "llamacpp"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(peers.RESULT_MARKER))
    result = json.loads(line[len(peers.RESULT_MARKER) :])
    assert proc.returncode == 0 and result["skipped"]


def test_prompts_have_requested_lengths(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    # A tiny word-level tokenizer stands in for SmolLM2's.
    words = (peers.SHORT_PROMPT + peers.LONG_HEADER + peers.LONG_FOOTER + " lorem").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[UNK]", *words]))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = tmp_path / "text.txt"
    text.write_text("lorem " * 1000)
    p = peers.default_prompts(path, long_tokens=300, text_file=text)
    assert len(p["long"]) == 300 and 5 < len(p["short"]) < 40


def test_markdown_table_handles_skips() -> None:
    md = peers.markdown_table(
        [
            {"system": "llamacpp", "skipped": "absent"},
            {
                "system": "ortgenai",
                "label": "ort",
                "skipped": None,
                "decode_tok_s": 1.0,
                "ttft_short_ms": 2.0,
                "ttft_long_ms": 3.0,
                "peak_rss_mib": 4.0,
                "batch_tok_s": None,
                "batch_size": None,
                "prompt_tokens": {"short": 21, "long": 500},
            },
        ]
    )
    assert "skipped: absent" in md and "| ort | 1.0 |" in md


@pytest.mark.slow
def test_real_peers_measure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every installed peer measures something on the real model (needs setup_peers.sh).

    tests/conftest.py points EDGE_LLM_CACHE at a temporary folder; the peers (venv, models)
    live in the user's cache, so use that one (or $EDGE_LLM_PEERS_TEST_CACHE).
    """
    default = Path.home() / ".cache" / "edge-llm"
    cache = Path(os.environ.get("EDGE_LLM_PEERS_TEST_CACHE", default))
    monkeypatch.setenv("PEERS_VENV", str(cache / "peers-venv"))
    prompts = peers.default_prompts(peers.prepare_hf(cache) / "tokenizer.json")
    settings = {"runs": 1, "warmup": 0, "new_tokens": 8, "batch_size": 2, "cache": str(cache)}
    for system in peers.SYSTEMS:
        r = peers.run_peer(system, prompts, settings)
        if r["skipped"]:
            assert "setup_peers.sh" in r["skipped"], r["skipped"]
            continue
        assert r["decode_tok_s"] > 0 and r["ttft_long_ms"] > 0 and r["peak_rss_mib"] > 0
        assert r["prompt_tokens"] == {"short": len(prompts["short"]), "long": 500}
