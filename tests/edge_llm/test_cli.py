"""The CLI as a user runs it: a real subprocess on a real (tiny) bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def edge_llm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_llm.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def test_generate_streams_and_reports_stats(tiny_bundle: Path) -> None:
    proc = edge_llm(
        "generate", "--bundle", str(tiny_bundle), "--max-tokens", "7", "--ignore-eos", "--stats", "hello"
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["completion_tokens"] == 7 and stats["finish_reason"] == "length"
    assert stats["prompt_tokens"] > 3 and stats["decode_tok_s"] > 0


def test_generate_raw_seeded_is_reproducible(tiny_bundle: Path) -> None:
    args = (
        "generate",
        "--bundle",
        str(tiny_bundle),
        "--raw",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--temperature",
        "0.9",
        "--seed",
        "5",
        "Small models",
    )
    first, second = edge_llm(*args), edge_llm(*args)
    assert first.returncode == 0 and first.stdout == second.stdout and first.stdout.strip()


def test_chat_reads_turns_from_stdin(tiny_bundle: Path) -> None:
    proc = edge_llm(
        "chat", "--bundle", str(tiny_bundle), "--max-tokens", "4", "--ignore-eos", stdin="hi\nand again\n\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 2


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    proc = edge_llm("generate", "--bundle", str(tmp_path / "missing"), "hi")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"edge-llm: error: {tmp_path / 'missing'}: bundle folder not found"


def test_too_long_prompt_is_refused(tiny_bundle: Path) -> None:
    proc = edge_llm("generate", "--bundle", str(tiny_bundle), "--raw", "--max-tokens", "250", "word " * 50)
    assert proc.returncode == 2 and "exceeds the context window" in proc.stderr


def test_doctor_json() -> None:
    proc = edge_llm("doctor", "--json")
    assert proc.returncode == 0
    info = json.loads(proc.stdout)
    assert "CPUExecutionProvider" in info["providers"] and info["cpu_count"] >= 1


def test_export_rejects_bad_source(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"NOPE" + b"\0" * 16)
    proc = edge_llm("export", "--model", str(bogus), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a GGUF file" in proc.stderr
    proc = edge_llm("export", "--model", "not-a-thing", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a hub id" in proc.stderr


def test_export_static_flag(tiny_hf: Path, tmp_path: Path) -> None:
    proc = edge_llm(
        "export", "--model", str(tiny_hf), "--quant", "int8", "--static", "64,8", "--out", str(tmp_path / "x")
    )
    assert proc.returncode == 2 and "[static]" in proc.stderr  # fused int8 graphs have no fixed shapes
    proc = edge_llm(
        "export", "--model", str(tiny_hf), "--quant", "none", "--static", "64", "--out", str(tmp_path / "x")
    )
    assert proc.returncode == 2 and "PAST,PREFILL" in proc.stderr
    out = tmp_path / "s"
    proc = edge_llm(
        "export", "--model", str(tiny_hf), "--quant", "none", "--static", "64,8", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    graph = json.loads((out / "bundle.json").read_text())["graph"]
    assert (graph["kv_layout"], graph["past_length"], graph["prefill_length"]) == ("static", 64, 8)
