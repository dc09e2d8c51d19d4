"""What every pipeline stage is: config + artifact in, artifact out, cached by one wrapper.

A stage module (prune, distill, to_onnx, quantize, fix_shapes, evaluate) defines

    def build(config, art: Artifact, out: Path, progress: bool) -> None   # write its output
    def result(config, art: Artifact, folder: Path) -> Artifact           # read it back
    STAGE = Stage("name", build, result)                                  # (+ key=, chained=)

and the recipe lists it once (`recipe.STAGES`). `run` is the one wrapper: it keys the output by
the stage's config and its input's key, builds it only when the cache has no complete copy
(`cache.cached_stage`), and logs one line per stage. So `result` must rebuild the artifact from
the folder alone: a cached stage never ran `build` in this process.

Three steps sit outside this shape on purpose: load makes the first artifact (its key needs the
source's identity, found by downloading it), and bundle and report write the output folder the
user named, which is not a cache entry. Evaluations are stages (`chained=False`: they describe
an artifact without changing the keys after them), so an unchanged recipe re-uses them too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from export.cache import cached_stage, stable_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """What the pipeline has built so far; each stage returns a copy with its own part."""

    key: str  # cache key of the newest output in the chain; later keys derive from it
    key_parts: tuple[Any, ...]  # stable_key(*key_parts) == key (see to_onnx's key)
    source: dict[str, Any]  # where the model came from (load)
    teacher: Path  # the loaded, unpruned HF folder
    hf_dir: Path  # the current HF model (after prune / distill)
    last: str = "load"  # the stage that made the newest output
    graph: Path | None = None  # the current ONNX graph file (to_onnx -> quantize -> fix_shapes)
    extra_graphs: dict[str, Path] = field(default_factory=dict)  # bundle file name -> graph file
    # GraphSpec fields the graph stages decided (kv_layout, logits, prefill_*), plus
    # "context_length" (0: the model's own)
    layout: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)  # the quantize report
    bundle: Path | None = None  # the written bundle folder
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # after stage -> facts
    facts: dict[str, Any] = field(default_factory=dict)  # the newest stage's, for the stage log


Build = Callable[[Any, Artifact, Path, bool], None]
Result = Callable[[Any, Artifact, Path], Artifact]


def chain_key(config: Any, art: Artifact) -> str:
    return stable_key(art.key, config)


@dataclass(frozen=True)
class Stage:
    name: str
    build: Build
    result: Result
    key: Callable[[Any, Artifact], str] = chain_key
    # False: the output describes the artifact (an evaluation) and later keys do not chain from it
    chained: bool = True


@dataclass
class StageLog:
    """One entry per stage (name, seconds, cached, facts) for the report; `echo` also prints a
    line per stage on stderr (the CLI's progress)."""

    echo: bool = False
    stages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, stage: str, seconds: float, cached: bool, **facts: Any) -> None:
        self.stages.append({"stage": stage, "seconds": round(seconds, 2), "cached": cached, **facts})
        log.info("stage %s: %s in %.1fs %s", stage, "cached" if cached else "done", seconds, facts)
        self.say(stage, seconds, cached)

    def say(self, stage: str, seconds: float, cached: bool) -> None:
        if self.echo:
            print(f"export: {stage:<16} {'cached' if cached else 'ran':<6} {seconds:7.1f} s", file=sys.stderr)


def run(
    stage: Stage, config: Any, art: Artifact, stages: StageLog, progress: bool, name: str = ""
) -> Artifact:
    """The artifact after `stage` (cached by its key); `name` overrides the stage's name in the
    cache and the log (evaluations are named after the stage they evaluate)."""
    name = name or stage.name
    key = stage.key(config, art)
    t = time.perf_counter()
    folder, cached = cached_stage(name, key, lambda out: stage.build(config, art, out, progress))
    base = replace(art, key=key, key_parts=(key,), last=stage.name) if stage.chained else art
    out = stage.result(config, replace(base, facts={}), folder)
    stages.add(name, time.perf_counter() - t, cached, **out.facts)
    return out
