"""The stage cache stays bounded: LRU eviction, what it never removes, `edge-llm cache`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edge_llm.cli import main
from edge_llm.errors import ConfigError
from export import cache
from export import recipe as recipe_mod
from tests.conftest import build_tiny_hf


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGE_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGE_LLM_CACHE_MAX_GB", raising=False)
    return tmp_path / "cache"


def _stage(name: str, size: int, used: float, complete: bool = True) -> Path:
    """A stage output of `size` bytes last used at `used` (epoch seconds)."""
    folder = cache_stages() / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"x" * size)
    if complete:
        (folder / cache.DONE).write_text("ok\n")
        os.utime(folder / cache.DONE, (used, used))
    else:
        os.utime(folder / "model.onnx", (used, used))
    return folder


def cache_stages() -> Path:
    return cache.stages_root()


def test_evict_removes_least_recently_used_first_and_stops_under_the_bound(root: Path) -> None:
    now = time.time()
    old = _stage("quantize-old", 4000, now - 300)
    mid = _stage("quantize-mid", 3000, now - 200)
    new = _stage("quantize-new", 2000, now - 100)
    removed = cache.evict(6000)
    assert [e.path for e in removed] == [old]
    assert not old.exists() and mid.exists() and new.exists()
    assert cache.evict(None) == []  # unbounded: nothing goes
    assert cache.evict(10_000) == []  # already fits


def test_evict_keeps_this_runs_outputs_and_partial_folders(root: Path) -> None:
    now = time.time()
    partial = _stage("distill-abc.partial", 5000, now - 1000, complete=False)
    old = _stage("to_onnx-old", 1000, now - 500)
    ours = _stage("to_onnx-ours", 1000, now)
    removed = cache.evict(0, used_since=now - 10)
    assert [e.path for e in removed] == [old]
    assert partial.exists() and ours.exists()


def test_a_cache_hit_counts_as_a_use(root: Path) -> None:
    built = []
    folder, hit = cache.cached_stage("load", "k1", lambda out: built.append(out))
    assert not hit and len(built) == 1
    os.utime(folder / cache.DONE, (1.0, 1.0))
    before = time.time() - 1
    folder2, hit = cache.cached_stage("load", "k1", lambda out: built.append(out))
    assert hit and folder2 == folder and len(built) == 1
    assert (folder / cache.DONE).stat().st_mtime >= before


def test_bound_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_LLM_CACHE_MAX_GB", raising=False)
    assert cache.max_bytes() == int(cache.DEFAULT_MAX_GB * 1024**3)
    monkeypatch.setenv("EDGE_LLM_CACHE_MAX_GB", "0.5")
    assert cache.max_bytes() == 512 * 1024**2
    monkeypatch.setenv("EDGE_LLM_CACHE_MAX_GB", "0")
    assert cache.max_bytes() is None
    monkeypatch.setenv("EDGE_LLM_CACHE_MAX_GB", "lots")
    with pytest.raises(ConfigError, match="EDGE_LLM_CACHE_MAX_GB='lots'"):
        cache.max_bytes()


def test_recipe_run_evicts_older_outputs_but_not_its_own(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = _stage("quantize-stale", 1000, time.time() - 3600)
    hf = build_tiny_hf(tmp_path / "hf")
    path = tmp_path / "r.toml"
    path.write_text(f'name = "tiny"\n[load]\nmodel = "{hf}"\n[quantize]\nmode = "none"\n')
    monkeypatch.setenv("EDGE_LLM_CACHE_MAX_GB", "0.000001")  # ~1 KB: everything old must go
    out = recipe_mod.run(recipe_mod.load_recipe(path), tmp_path / "bundle")
    assert (out / "bundle.json").is_file()
    assert not stale.exists()
    left = {p.name.split("-")[0] for p in cache_stages().iterdir()}
    assert {"load", "to_onnx", "quantize"} <= left  # this run's outputs, although over the bound


def test_cli_lists_prunes_and_clears(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    old = _stage("quantize-old", 4000, now - 7200)
    new = _stage("quantize-new", 2000, now - 60)
    partial = _stage("distill-x.partial", 100, now, complete=False)
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert listing.index("quantize-old") < listing.index("quantize-new")  # least recently used first
    assert "2 h ago" in listing and "partial" in listing
    assert main(["cache", "--max-gb", str(3000 / 1024**3), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in got["removed"]] == ["quantize-old"] and not old.exists()
    assert main(["cache", "--clear"]) == 0
    assert not new.exists() and partial.exists()
    assert main(["cache", "--clear", "--partial"]) == 0
    assert not partial.exists()
    assert main(["cache", "--partial"]) == 2
    assert "--partial goes with --clear" in capsys.readouterr().err


def test_outputs_another_live_run_may_use_are_spared(root: Path) -> None:
    now = time.time()
    older = _stage("to_onnx-older", 1000, now - 7200)
    read_by_b = _stage("to_onnx-b", 1000, now - 600)  # run B (alive) used it after it started
    runs = cache_stages() / cache.RUNS
    runs.mkdir(parents=True)
    (runs / f"{os.getpid()}-b").write_text(f"{now - 900}\n")  # B started 15 min ago, still alive
    dead = runs / "999999999-x"  # a run whose process is gone: its mark is ignored and removed
    dead.write_text(f"{now - 99999}\n")
    removed = cache.evict(0, used_since=now)
    assert [e.path for e in removed] == [older] and read_by_b.exists()
    assert not dead.exists() and (runs / f"{os.getpid()}-b").exists()
    assert all(not e.path.name.startswith(".") for e in cache.stage_entries())  # marks are not outputs


def test_running_marks_the_run_while_it_lasts(root: Path) -> None:
    with cache.running() as started:
        marks = list((cache_stages() / cache.RUNS).iterdir())
        assert len(marks) == 1 and marks[0].name.startswith(f"{os.getpid()}-")
        assert started <= time.time() and cache.live_run_starts() == [started]
    assert not list((cache_stages() / cache.RUNS).iterdir())


def test_cli_clear_leaves_what_a_live_run_uses(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    old = _stage("quantize-old", 100, now - 7200)
    with cache.running():
        in_use = _stage("quantize-in-use", 100, time.time())  # the running export touched it
        assert main(["cache", "--clear"]) == 0
    assert not old.exists() and in_use.exists()
    assert "1 export run(s) in progress" in capsys.readouterr().out


def test_two_builders_of_one_entry_build_it_once(root: Path) -> None:
    """Two exports missing the same entry at once (a shared cache): the second waits for the
    first's folder instead of building into the same partial folder and losing it to a rename."""
    import threading

    started = threading.Event()
    calls: list[str] = []

    def build(out: Path) -> None:
        calls.append(out.name)
        started.set()
        time.sleep(0.3)  # the other builder arrives while this one is still building
        (out / "answers.json").write_text("[]")

    results: list[tuple[Path, bool]] = []
    first = threading.Thread(target=lambda: results.append(cache.cached_stage("qa-answers", "k", build)))
    first.start()
    assert started.wait(10)
    second = cache.cached_stage("qa-answers", "k", build)
    first.join()
    assert len(calls) == 1
    assert results == [(cache.stage_dir("qa-answers", "k"), False)]
    assert second == (cache.stage_dir("qa-answers", "k"), True)
    assert (second[0] / "answers.json").read_text() == "[]"
    assert [e.path.name for e in cache.stage_entries()] == ["qa-answers-k"]  # the lock file is no entry
