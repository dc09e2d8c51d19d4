"""A recipe chains the stages: TOML (or flags) in, a verified bundle folder with its report out.

load → prune → distill → to_onnx → quantize (→ fix_shapes) → bundle → evaluate → report (→ bundle again, with
the report files inside). `Recipe` has one section per stage, each the stage's own frozen config;
prune, distill and evaluate are optional (absent: skipped). Unknown keys, wrong types, impossible
ratios and an evaluation span that overlaps the training/calibration text are rejected by
`edge_llm.config` / the configs' checks before any work starts; ratios the model's shape cannot
take are rejected right after load (cached), before pruning. Each stage's output is cached under
a key of its config and its input's key, so changing a later stage reuses the earlier ones; an
interrupted distillation resumes from its checkpoint in the stage's `.partial` folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_llm.config import load_toml
from edge_llm.errors import ExportError
from export import bundle as bundle_stage
from export import cache, targets
from export import distill as distill_stage
from export import evaluate as evaluate_stage
from export import fix_shapes as fix_shapes_stage
from export import load as load_stage
from export import prune as prune_stage
from export import quantize as quantize_stage
from export import report as report_stage
from export import to_onnx as to_onnx_stage
from export.cache import cached_stage, stable_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str = "model"
    load: load_stage.LoadConfig = field(default_factory=load_stage.LoadConfig)
    prune: prune_stage.PruneConfig | None = None
    distill: distill_stage.DistillConfig | None = None
    to_onnx: to_onnx_stage.ToOnnxConfig = field(default_factory=to_onnx_stage.ToOnnxConfig)
    quantize: quantize_stage.QuantizeConfig = field(default_factory=quantize_stage.QuantizeConfig)
    static: fix_shapes_stage.FixShapesConfig | None = None  # fixed-shape graphs for NPUs
    evaluate: evaluate_stage.EvaluateConfig | None = None
    report: report_stage.ReportConfig = field(default_factory=report_stage.ReportConfig)
    bundle: bundle_stage.BundleConfig = field(default_factory=bundle_stage.BundleConfig)
    target: targets.TargetConfig = field(default_factory=targets.TargetConfig)

    def __post_init__(self) -> None:
        if self.static is not None and (
            self.to_onnx.graph == "fused" or self.quantize.mode in ("int8", "grid")
        ):
            raise ValueError(
                "[static] fixes the shapes of an optimum graph of standard ops: it needs to_onnx.graph "
                "'optimum' (or 'auto') and quantize.mode 'qdq', 'dynamic' or 'none'"
            )
        ev = self.evaluate
        if ev is None:
            return
        for stage, cfg in (("distill", self.distill), ("prune", self.prune)):
            if cfg is None or not _same_file(cfg.text, ev.text):
                continue
            if evaluate_stage.overlaps(cfg.span, ev.span):
                raise ValueError(
                    f"evaluate.span {list(ev.span)} overlaps {stage}.span {list(cfg.span)} of the same "
                    f"text file: evaluation must use held-out text"
                )
        d = self.distill
        if d is not None and d.chat_tokens and ev.chat_tokens and d.seed == ev.chat_seed:
            raise ValueError(
                f"evaluate.chat_seed {ev.chat_seed} equals distill.seed: the chat turns evaluated on "
                f"would be the ones distillation trained on"
            )
        if (
            self.quantize.mode == "qdq"
            and self.quantize.calib_text is not None
            and _same_file(self.quantize.calib_text, ev.text)
            and evaluate_stage.overlaps(self.quantize.calib_span, ev.span)
        ):
            raise ValueError("quantize.calib_span overlaps evaluate.span of the same text file")


def _same_file(a: Path, b: Path) -> bool:
    root = evaluate_stage.REPO_ROOT
    return (root / Path(a).expanduser()).resolve() == (root / Path(b).expanduser()).resolve()


def load_recipe(path: str | Path) -> Recipe:
    return load_toml(path, Recipe)


@dataclass
class StageLog:
    """What each stage did, for the bundle's report."""

    stages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, stage: str, seconds: float, cached: bool, **facts: Any) -> None:
        self.stages.append({"stage": stage, "seconds": round(seconds, 2), "cached": cached, **facts})
        log.info("stage %s: %s in %.1fs %s", stage, "cached" if cached else "done", seconds, facts)


def run(recipe: Recipe, out_dir: Path, progress: bool = False) -> Path:
    """Run every stage of `recipe` and write the bundle (with its report) to `out_dir`; then
    bring the stage cache back under its bound (sparing what this and other live runs use)."""
    limit = cache.max_bytes()  # a bad EDGE_LLM_CACHE_MAX_GB fails before any work
    with cache.running() as started:
        out = _run(recipe, out_dir, progress)
        for e in cache.evict(limit, used_since=started):
            log.info("cache: removed %s (%.0f MiB, least recently used)", e.path.name, e.bytes / 2**20)
    return out


def _run(recipe: Recipe, out_dir: Path, progress: bool) -> Path:
    recipe = targets.adapt(recipe)
    standard_ops = recipe.quantize.mode in ("dynamic", "qdq") or recipe.static is not None
    if recipe.to_onnx.graph == "auto" and standard_ops:
        # ORT's dynamic / QDQ quantizers, fixed shapes (and the NPUs both are for) need standard ops.
        recipe = replace(recipe, to_onnx=replace(recipe.to_onnx, graph="optimum"))
    elif recipe.to_onnx.graph == "fused" and recipe.quantize.mode in ("dynamic", "qdq"):
        raise ExportError(f"quantize.mode {recipe.quantize.mode!r} needs to_onnx.graph 'optimum'")
    stages = StageLog()
    evals: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()
    t = time.perf_counter()
    loaded = load_stage.run(recipe.load)
    stages.add("load", time.perf_counter() - t, loaded.cached, source=loaded.source.get("name"))
    teacher = loaded.hf_dir
    key = stable_key(recipe.load, loaded.source)
    model_dir = loaded.hf_dir
    if recipe.prune is not None:
        prune_stage.check_model(recipe.prune, loaded.hf_dir)  # impossible ratios fail before work
    _evaluate_hf(recipe, "load", key, model_dir, None, evals, progress)

    if recipe.prune is not None:
        key = stable_key(key, recipe.prune)
        cfg = recipe.prune
        t = time.perf_counter()
        model_dir, cached = cached_stage(
            "prune", key, lambda out: prune_stage.run(cfg, teacher, out, progress)
        )
        rep = json.loads((model_dir / prune_stage.REPORT).read_text())
        stages.add(
            "prune",
            time.perf_counter() - t,
            cached,
            parameters=rep["parameters_after"],
            dropped_layers=rep["dropped_layers"],
            plan=rep["plan"],
        )
        _evaluate_hf(recipe, "prune", key, model_dir, teacher, evals, progress)

    if recipe.distill is not None:
        key = stable_key(key, recipe.distill)
        dcfg, student = recipe.distill, model_dir
        t = time.perf_counter()
        model_dir, cached = cached_stage(
            "distill", key, lambda out: distill_stage.run(dcfg, teacher, student, out, progress=progress)
        )
        rep = json.loads((model_dir / distill_stage.REPORT).read_text())
        stages.add(
            "distill",
            time.perf_counter() - t,
            cached,
            tokens=rep["tokens_trained"],
            steps=rep["steps"],
            train_seconds=rep["seconds"],
            text=rep["text"],
            first_loss=rep["first_loss"],
            last_loss=rep["last_loss"],
            held_out_curve=[(c["tokens"], c["perplexity"]) for c in rep.get("curve", [])],
        )
        _evaluate_hf(recipe, "distill", key, model_dir, teacher, evals, progress)

    if model_dir == loaded.hf_dir:  # the key unpruned exports always had: keeps their cache
        key = stable_key(recipe.load, loaded.source, recipe.to_onnx, to_onnx_stage.STAGE_VERSION)
    else:
        key = stable_key(key, recipe.to_onnx, to_onnx_stage.STAGE_VERSION)
    src = model_dir
    t = time.perf_counter()
    onnx_dir, cached = cached_stage("to_onnx", key, lambda out: to_onnx_stage.run(recipe.to_onnx, src, out))
    stages.add("to_onnx", time.perf_counter() - t, cached)

    key = stable_key(key, recipe.quantize)
    t = time.perf_counter()
    q_dir, cached = cached_stage(
        "quantize",
        key,
        lambda out: quantize_stage.run(recipe.quantize, onnx_dir / "model.onnx", out, hf_dir=src),
    )
    quant = quantize_stage.read_report(q_dir)
    stages.add("quantize", time.perf_counter() - t, cached, **quantize_stage.summary(quant["errors"]))

    layout = to_onnx_stage.read_layout(onnx_dir)
    bcfg = replace(
        recipe.bundle if recipe.bundle.name != "model" else _named(recipe),
        kv_layout=layout["kv_layout"],
        logits=layout["logits"],
        context_length=recipe.bundle.context_length or layout["context_length"],
        target=recipe.target.name,
    )
    graph, graphs = q_dir / "model.onnx", {}
    if recipe.static is not None:
        scfg = recipe.static
        key = stable_key(key, scfg)
        t = time.perf_counter()
        s_dir, cached = cached_stage(
            "fix_shapes", key, lambda out: fix_shapes_stage.run(scfg, q_dir / "model.onnx", out)
        )
        stages.add("fix_shapes", time.perf_counter() - t, cached, **asdict(scfg))
        graph, graphs = s_dir / "model.onnx", {"prefill.onnx": s_dir / "prefill.onnx"}
        bcfg = replace(
            bcfg,
            kv_layout="static",
            context_length=scfg.past_length,
            prefill_file="prefill.onnx",
            prefill_length=scfg.prefill_length,
            past_length=scfg.past_length,
        )

    def write_bundle(extra: dict[str, Path]) -> Path:
        return bundle_stage.run(
            bcfg,
            bundle_stage.BundleInputs(
                graph=graph,
                hf_dir=model_dir,
                quantization=quant["method"],
                source=loaded.source,
                recipe={**evaluate_stage.jsonable(asdict(recipe)), "stages": stages.stages},
                extra_files={**graphs, **extra},
            ),
            out_dir,
        )

    t = time.perf_counter()
    out = write_bundle({})
    stages.add("bundle", time.perf_counter() - t, False, path=str(out))
    if recipe.evaluate is not None:
        t = time.perf_counter()
        evals["bundle"] = evaluate_stage.run(recipe.evaluate, out, teacher, progress=progress)
        stages.add("evaluate", time.perf_counter() - t, False, **_brief(evals["bundle"]))
    t = time.perf_counter()
    stages.add("report", 0.0, False)
    stages.stages[-1]["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report_dir = out.with_name(out.name + ".report")
    files = report_stage.run(
        recipe.report,
        {"name": bcfg.name, "stages": stages.stages, "evaluations": evals, "quantization": quant},
        report_dir,
    )
    stages.stages[-1]["seconds"] = round(time.perf_counter() - t, 2)
    out = write_bundle(files)
    for f in files.values():
        f.unlink()
    report_dir.rmdir()
    return out


def _evaluate_hf(
    recipe: Recipe,
    stage: str,
    key: str,
    hf_dir: Path,
    teacher: Path | None,
    evals: dict[str, dict[str, Any]],
    progress: bool,
) -> None:
    """Evaluate an intermediate HF model (cached by stage key); skipped without [evaluate]."""
    cfg = recipe.evaluate
    if cfg is None or not recipe.report.stage_evals:
        return
    teacher = teacher if recipe.report.stage_teacher else None
    ekey = stable_key(key, cfg, str(teacher))

    def build(out: Path) -> None:
        evaluate_stage.save(evaluate_stage.run(cfg, hf_dir, teacher, progress=progress), out / "result.json")

    folder, _ = cached_stage(f"evaluate_{stage}", ekey, build)
    evals[stage] = json.loads((folder / "result.json").read_text())


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "perplexity",
        "kl_to_teacher",
        "top1_agreement",
        "parameters",
        "size_bytes",
        "decode_tok_s",
        "ttft_s",
    )
    return {k: result[k] for k in keys if k in result}


def _named(recipe: Recipe) -> bundle_stage.BundleConfig:
    return bundle_stage.BundleConfig(**{**asdict(recipe.bundle), "name": recipe.name})
