"""Where the pipeline keeps what it downloads and builds: `~/.cache/edge-llm` (or $EDGE_LLM_CACHE).

Stage outputs live under `stages/<stage>-<key>/`, key = hash of everything that determines the
output (the stage's config and its input's key), so a rerun with the same inputs is free and a
changed later stage does not redo earlier ones. A stage writes into a temporary folder and renames
it when complete, so an interrupted run never leaves a half-written output that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

DONE = ".complete"


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


def stage_dir(stage: str, key: str) -> Path:
    return cache_root() / "stages" / f"{stage}-{key}"


def cached_stage(stage: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (folder, was_cached); run `build(tmp_folder)` only when no complete output exists."""
    final = stage_dir(stage, key)
    if (final / DONE).exists():
        return final, True
    tmp = final.with_name(final.name + ".partial")
    # A partial folder may hold a resumable checkpoint (distillation): keep it, build into it.
    tmp.mkdir(parents=True, exist_ok=True)
    build(tmp)
    (tmp / DONE).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final, False
