"""The CLI as a user runs it: a real subprocess on a real (tiny) bundle."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm.cli import build_parser
from edge_llm.commands.generate import unescape
from edge_llm.paths import link_default


def edge_llm(*args: str, stdin: str | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; `cache` sets its EDGE_LLM_CACHE (default: the test session's)."""
    env = {**os.environ, "EDGE_LLM_CACHE": str(cache)} if cache else None
    return subprocess.run(
        [sys.executable, "-m", "edge_llm.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env=env,
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


def test_doctor_names_version_cache_and_extras(tmp_path: Path) -> None:
    from edge_llm import __version__

    info = json.loads(edge_llm("doctor", "--json", cache=tmp_path / "c").stdout)
    assert info["edge_llm"] == __version__ and info["cache"] == str(tmp_path / "c")
    # pytest, ruff and psutil run this very test: an installed edge-llm reports its test extra
    assert info["extras"].get("test") == "yes" or "?" in info["extras"]
    assert not (tmp_path / "c").exists()  # a read-only command creates no cache folder
    text = edge_llm("doctor", cache=tmp_path / "c").stdout
    assert __version__ in text.splitlines()[0]
    assert "extras" in text and str(tmp_path / "c") in text


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


def test_help_shows_defaults() -> None:
    text = edge_llm("generate", "--help").stdout
    assert "(default: 256)" in text and "(default: 1.0)" in text and "(default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 8192)" in edge_llm("eval", "--help").stdout


@pytest.mark.parametrize(
    ("given", "meant"),
    [(r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\\n", "\\n"), (r"\x41\u00e9", "Aé"), ("<|im_end|>",) * 2],
)
def test_stop_strings_decode_c_escapes(given: str, meant: str) -> None:
    assert unescape(given) == meant
    for command in (["generate"], ["send", "--socket", "/x"]):
        assert build_parser().parse_args([*command, "--stop", given, "hi"]).stop == [meant]


@pytest.mark.parametrize("bad", [r"\d", "end\\", ""])
def test_stop_string_bad_escape_is_refused(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        unescape(bad)
    proc = edge_llm("generate", "--stop", bad, "hi")
    assert proc.returncode == 2 and "argument --stop" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("raw", [[], ["--raw"]])
@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_empty_prompt_is_refused_alike_chat_or_raw(tiny_bundle: Path, raw: list[str], prompt: str) -> None:
    proc = edge_llm("generate", "--bundle", str(tiny_bundle), *raw, prompt)
    assert proc.returncode == 2 and proc.stderr.strip() == "edge-llm: error: the prompt is empty"
    proc = edge_llm("send", "--socket", "/nonexistent.sock", *raw, prompt)
    assert proc.returncode == 2 and proc.stderr.strip() == "edge-llm: error: the prompt is empty"


def test_bundle_given_as_a_file_says_so(tiny_bundle: Path) -> None:
    proc = edge_llm("generate", "--bundle", str(tiny_bundle / "bundle.json"), "hi")
    assert proc.returncode == 2
    assert "bundle.json: is a file; --bundle expects the bundle folder" in proc.stderr


def test_no_default_bundle_names_the_export_command(tmp_path: Path) -> None:
    for command in (["generate", "hi"], ["chat"], ["serve", "--socket", str(tmp_path / "s")], ["bench"]):
        proc = edge_llm(*command, cache=tmp_path / "empty-cache")
        assert proc.returncode == 2, command
        assert "no --bundle given and no default bundle" in proc.stderr and "`edge-llm export`" in proc.stderr


def test_default_bundle_is_used_without_bundle_flag(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    bundles = cache / "bundles"
    bundles.mkdir(parents=True)
    shutil.copytree(tiny_bundle, bundles / "tiny-abc")
    with monkeypatch.context() as m:
        m.setenv("EDGE_LLM_CACHE", str(cache))
        link = link_default(bundles / "tiny-abc")
    assert link.is_symlink() and os.readlink(link) == "tiny-abc"  # relative: the cache can move
    proc = edge_llm("generate", "--max-tokens", "3", "--ignore-eos", "--stats", "hi", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1])["completion_tokens"] == 3
    listing = edge_llm("cache", cache=cache).stdout
    assert "default -> tiny-abc" in listing and "tiny-abc" in listing


def test_export_without_out_writes_the_default_bundle(tiny_hf: Path, tmp_path: Path) -> None:
    cache = Path(os.environ["EDGE_LLM_CACHE"])  # the session's: its stages are already built
    home = tmp_path / "cache"
    shutil.copytree(cache, home, symlinks=True, dirs_exist_ok=True)
    args = ("export", "--model", str(tiny_hf), "--quant", "none", "--name", "tiny-default")
    first = edge_llm(*args, cache=home)
    assert first.returncode == 0, first.stderr
    assert "bundle written:" in first.stdout and "default bundle:" in first.stdout
    default = home / "bundles" / "default"
    assert default.is_symlink() and (default / "bundle.json").is_file()
    assert os.readlink(default).startswith("tiny-default-")
    again = edge_llm(*args, cache=home)
    assert again.returncode == 0 and "bundle up to date" in again.stdout
    proc = edge_llm("generate", "--max-tokens", "2", "--ignore-eos", "hi", cache=home)
    assert proc.returncode == 0, proc.stderr


def test_cache_lists_bundles_and_models_and_survives_a_closed_pipe(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "some-model.gguf").write_bytes(b"\0" * 4096)
    (cache / "bundles" / "b1").mkdir(parents=True)
    (cache / "bundles" / "b1" / "model.onnx").write_bytes(b"\0" * 2**20)
    out = edge_llm("cache", cache=cache).stdout
    assert "some-model.gguf" in out and "b1" in out and "bundles:" in out and "models:" in out
    listing = json.loads(edge_llm("cache", "--json", cache=cache).stdout)
    assert listing["bundles"] == [{"name": "b1", "bytes": 2**20}]
    assert listing["models"] == [{"name": "some-model.gguf", "bytes": 4096}]
    # `edge-llm cache | head` with the reader gone before the first write: no traceback
    env = {**os.environ, "EDGE_LLM_CACHE": str(cache)}
    command = [sys.executable, "-m", "edge_llm.cli", "cache"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_an_unreadable_password_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`send --password-file` and a profile's [mqtt] password_file are read by one function: an
    error naming the option and the file, before any connection."""
    from edge_llm.board import MqttConfig
    from edge_llm.cli import main
    from edge_llm.errors import ConfigError
    from edge_llm.transports.mqtt import make_client

    missing = tmp_path / "none.pw"
    argv = ["send", "--mqtt", "127.0.0.1:9", "--device", "d", "--password-file", str(missing), "hi"]
    assert main(argv) == 2
    assert f"--password-file: cannot read {missing}: No such file or directory" in capsys.readouterr().err
    cfg = MqttConfig(host="h", device="d", username="u", password_file=str(missing))
    with pytest.raises(ConfigError, match=f"mqtt.password_file: cannot read {missing}"):
        make_client(cfg, "c")
    pw = tmp_path / "ok.pw"
    pw.write_text("secret\n")
    assert make_client(MqttConfig(host="h", device="d", username="u", password_file=str(pw)), "c")


def test_default_bundle_key_follows_the_pad_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # A padded recipe's bundle must be rebuilt when the pad's graph changes (query_pad switch),
    # while an unpadded recipe's folder name does not move with it.
    import export.variants
    from edge_llm.commands.export import _recipe_key
    from export.recipe import load_recipe

    padded = load_recipe(Path(__file__).parents[2] / "configs/recipes/smollm2-int8.toml")
    plain = load_recipe(Path(__file__).parents[2] / "configs/recipes/smollm2-pruned-int8.toml")
    assert padded.fuse is not None and padded.fuse.pad_query_row
    assert plain.fuse is not None and not plain.fuse.pad_query_row
    args = argparse.Namespace()
    before = _recipe_key(args, padded), _recipe_key(args, plain)
    monkeypatch.setattr(export.variants, "PAD_VERSION", export.variants.PAD_VERSION + 1)
    after = _recipe_key(args, padded), _recipe_key(args, plain)
    assert after[0] != before[0] and after[1] == before[1]
