"""A recipe chains the stages: TOML (or flags) in, a verified bundle folder out.

`Recipe` has one optional section per stage, each the stage's own frozen config; unknown keys
and wrong types are rejected by `edge_llm.config` before any work starts. Each stage's output is
cached under a key of its config and its input's key, so changing a later stage reuses the
earlier ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_llm.config import load_toml
from export import bundle as bundle_stage
from export import load as load_stage
from export import quantize as quantize_stage
from export import to_onnx as to_onnx_stage
from export.cache import cached_stage, stable_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str = "model"
    load: load_stage.LoadConfig = field(default_factory=load_stage.LoadConfig)
    to_onnx: to_onnx_stage.ToOnnxConfig = field(default_factory=to_onnx_stage.ToOnnxConfig)
    quantize: quantize_stage.QuantizeConfig = field(default_factory=quantize_stage.QuantizeConfig)
    bundle: bundle_stage.BundleConfig = field(default_factory=bundle_stage.BundleConfig)


def load_recipe(path: str | Path) -> Recipe:
    return load_toml(path, Recipe)


@dataclass
class StageLog:
    """What each stage did, for the bundle's report."""

    stages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, stage: str, seconds: float, cached: bool, **facts: Any) -> None:
        self.stages.append({"stage": stage, "seconds": round(seconds, 2), "cached": cached, **facts})
        log.info("stage %s: %s in %.1fs %s", stage, "cached" if cached else "done", seconds, facts)


def run(recipe: Recipe, out_dir: Path) -> Path:
    """Run every stage of `recipe` and write the bundle to `out_dir`."""
    stages = StageLog()
    t = time.perf_counter()
    loaded = load_stage.run(recipe.load)
    stages.add("load", time.perf_counter() - t, loaded.cached, source=loaded.source.get("name"))

    key = stable_key(recipe.load, loaded.source, recipe.to_onnx)
    t = time.perf_counter()
    onnx_dir, cached = cached_stage(
        "to_onnx", key, lambda out: to_onnx_stage.run(recipe.to_onnx, loaded.hf_dir, out)
    )
    stages.add("to_onnx", time.perf_counter() - t, cached)

    key = stable_key(key, recipe.quantize)
    t = time.perf_counter()
    q_dir, cached = cached_stage(
        "quantize", key, lambda out: quantize_stage.run(recipe.quantize, onnx_dir / "model.onnx", out)
    )
    quant = quantize_stage.read_report(q_dir)
    stages.add("quantize", time.perf_counter() - t, cached, **quantize_stage.summary(quant["errors"]))

    t = time.perf_counter()
    out = bundle_stage.run(
        recipe.bundle if recipe.bundle.name != "model" else _named(recipe),
        bundle_stage.BundleInputs(
            graph=q_dir / "model.onnx",
            hf_dir=loaded.hf_dir,
            quantization=quant["method"],
            source=loaded.source,
            recipe={**asdict(recipe), "stages": stages.stages},
        ),
        out_dir,
    )
    stages.add("bundle", time.perf_counter() - t, False, path=str(out))
    return out


def _named(recipe: Recipe) -> bundle_stage.BundleConfig:
    return bundle_stage.BundleConfig(**{**asdict(recipe.bundle), "name": recipe.name})
