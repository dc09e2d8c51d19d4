"""Where the pipeline keeps what it downloads and builds: `~/.cache/edge-llm` (or $EDGE_LLM_CACHE).

Stage outputs live under `stages/<stage>-<key>/`, key = hash of everything that determines the
output (the stage's config and its input's key), so a rerun with the same inputs is free and a
changed later stage does not redo earlier ones. A stage writes into a temporary folder and renames
it when complete, so an interrupted run never leaves a half-written output that looks finished.

The stages folder is bounded: a recipe run ends with `evict`, which removes the least recently
used complete stage outputs (never one used since the start of this or any other live run —
`running` marks them under `stages/.runs` — and never a `.partial` folder: it may hold a
resumable distillation checkpoint) until the folder fits `EDGE_LLM_CACHE_MAX_GB` (default 20; 0
or less: no bound). Every SmolLM2 recipe variant adds ~0.8-1.5 GB (fp32 ONNX, quantized copy),
so a sweep would otherwise fill a workstation's disk. `edge-llm cache` lists and prunes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from edge_llm.errors import ConfigError

DONE = ".complete"
PARTIAL = ".partial"
RUNS = ".runs"  # under stages/: one mark per live recipe run
DEFAULT_MAX_GB = 20.0


def cache_root() -> Path:
    root = Path(os.environ.get("EDGE_LLM_CACHE", Path.home() / ".cache" / "edge-llm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def stable_key(*parts: Any) -> str:
    """A short hash of configs / strings / paths, stable across runs and machines."""

    def norm(x: Any) -> Any:
        if is_dataclass(x) and not isinstance(x, type):
            return {"__type__": type(x).__name__, **{k: norm(v) for k, v in asdict(x).items()}}
        if isinstance(x, dict):
            return {str(k): norm(v) for k, v in sorted(x.items())}
        if isinstance(x, list | tuple):
            return [norm(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        return x

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stages_root() -> Path:
    return cache_root() / "stages"


def stage_dir(stage: str, key: str) -> Path:
    return stages_root() / f"{stage}-{key}"


def cached_stage(stage: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (folder, was_cached); run `build(tmp_folder)` only when no complete output exists."""
    final = stage_dir(stage, key)
    if (final / DONE).exists():
        os.utime(final / DONE)  # its mtime is the last use that `evict` goes by
        return final, True
    final.parent.mkdir(parents=True, exist_ok=True)
    # Two exports missing the same entry (the cache is shared, and the teacher's QA answers are
    # one entry for every recipe over that teacher) would build into the same partial folder and
    # one would lose it to the other's rename: the second waits for the first's result instead.
    # The lock file stays (removing it would race a waiter); `stage_entries` lists folders only.
    with open(final.with_name(final.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / DONE).exists():
            os.utime(final / DONE)
            return final, True
        tmp = final.with_name(final.name + PARTIAL)
        # A partial folder may hold a resumable checkpoint (distillation): keep it, build into it.
        tmp.mkdir(parents=True, exist_ok=True)
        build(tmp)
        (tmp / DONE).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final, False


@dataclass(frozen=True)
class StageEntry:
    path: Path
    bytes: int
    last_used: float  # epoch seconds: a complete entry's last hit, a partial one's newest file
    complete: bool


def max_bytes() -> int | None:
    """The stages folder's bound from EDGE_LLM_CACHE_MAX_GB; None when unbounded (<= 0)."""
    raw = os.environ.get("EDGE_LLM_CACHE_MAX_GB", "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        raise ConfigError(f"EDGE_LLM_CACHE_MAX_GB={raw!r}: expected a number of GB") from None
    return int(gb * 1024**3) if gb > 0 else None


def stage_entries() -> list[StageEntry]:
    """Every stage folder in the cache, least recently used first."""
    root = stages_root()
    entries = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue
        files = [f for f in path.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        done = path / DONE
        complete = done.is_file() and not path.name.endswith(PARTIAL)
        newest = max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)
        entries.append(StageEntry(path, size, done.stat().st_mtime if complete else newest, complete))
    return sorted(entries, key=lambda e: e.last_used)


def evict(limit: int | None, used_since: float | None = None, partial: bool = False) -> list[StageEntry]:
    """Remove least recently used complete stage outputs (and with `partial` unfinished ones) until
    the stages folder is <= `limit` bytes (< 0: all of them). Outputs used at or after `used_since`
    (this run's), or since the start of any other recipe run still alive (`running`), stay.
    Returns what was removed."""
    if limit is None:
        return []
    starts = [t for t in (used_since, *live_run_starts()) if t is not None]
    since = min(starts) if starts else None
    entries = stage_entries()
    total = sum(e.bytes for e in entries)
    removed = []
    for e in entries:
        if total <= limit:
            break
        if not (e.complete or partial) or (since is not None and e.last_used >= since):
            continue
        shutil.rmtree(e.path)
        total -= e.bytes
        removed.append(e)
    return removed


@contextlib.contextmanager
def running() -> Iterator[float]:
    """Mark a recipe run as alive for its duration; yields its start time for `evict`.

    Every output a run uses is touched at or after its start, so another run's eviction that
    spares everything used since the oldest live start never removes a folder in use. (A start
    one second early: coarse file-system clocks.)"""
    start = time.time() - 1.0
    runs = stages_root() / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    mark = runs / f"{os.getpid()}-{os.urandom(4).hex()}"
    mark.write_text(f"{start}\n")
    try:
        yield start
    finally:
        mark.unlink(missing_ok=True)


def live_run_starts() -> list[float]:
    """Start times of the recipe runs whose process is alive; marks of dead ones are removed."""
    runs = stages_root() / RUNS
    starts = []
    for mark in runs.iterdir() if runs.is_dir() else []:
        try:
            pid, start = int(mark.name.split("-")[0]), float(mark.read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            mark.unlink(missing_ok=True)
            continue
        except PermissionError:  # alive, another user's
            pass
        except (ValueError, OSError):
            continue
        starts.append(start)
    return starts
