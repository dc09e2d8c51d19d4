"""A recipe chains the stages: TOML (or flags) in, a verified bundle folder with its report out.

load → trim_vocab → prune → distill → to_onnx → quantize (→ variants → draft → fix_shapes →
compile_qnn) → bundle → evaluate → report (→ bundle again, with the report files inside). `Recipe`
has one section per stage, each the stage's own frozen config; trim_vocab, prune, distill, fuse
(the variants stage), draft, static and evaluate are optional (absent: skipped; compile_qnn runs
for target qnn-htp). Unknown keys, wrong types,
impossible ratios, a missing text path and an evaluation span that overlaps the
training/calibration text are rejected by `edge_llm.config` / the configs' checks before any work
starts; ratios the model's shape cannot take are rejected right after load (cached), before
pruning. Every stage has one shape (`export/stage.py`: config + artifact in, artifact out) and
runs through one wrapper that caches its output under a key of its config and its input's key,
so changing a later stage reuses the earlier ones; an interrupted distillation resumes from its
checkpoint in the stage's `.partial` folder. Evaluations (of the loaded model, after prune and
distill, and of the bundle) are cached the same way. A new stage is one module with a `STAGE`
plus one entry in `STAGES` (and its section in `Recipe`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_llm.config import load_toml
from edge_llm.errors import ExportError
from export import bundle as bundle_stage
from export import cache, stage, targets
from export import compile_qnn as compile_qnn_stage
from export import distill as distill_stage
from export import evaluate as evaluate_stage
from export import fix_shapes as fix_shapes_stage
from export import load as load_stage
from export import prune as prune_stage
from export import quantize as quantize_stage
from export import report as report_stage
from export import to_onnx as to_onnx_stage
from export import train_draft as draft_stage
from export import trim_vocab as trim_vocab_stage
from export import variants as variants_stage
from export.cache import stable_key
from export.stage import Artifact, StageLog
from export.text import overlaps, same_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str = "model"
    load: load_stage.LoadConfig = field(default_factory=load_stage.LoadConfig)
    trim_vocab: trim_vocab_stage.TrimVocabConfig | None = None  # a smaller vocabulary
    prune: prune_stage.PruneConfig | None = None
    distill: distill_stage.DistillConfig | None = None
    to_onnx: to_onnx_stage.ToOnnxConfig = field(default_factory=to_onnx_stage.ToOnnxConfig)
    quantize: quantize_stage.QuantizeConfig = field(default_factory=quantize_stage.QuantizeConfig)
    fuse: variants_stage.FuseOptions | None = None  # fused graph: KV cache type, ragged variant
    static: fix_shapes_stage.FixShapesConfig | None = None  # fixed-shape graphs for NPUs
    draft: draft_stage.DraftConfig | None = None  # a trained speculative draft in the bundle
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
        if self.draft is not None and (
            self.static is not None or self.to_onnx.graph == "optimum" or self.to_onnx.logits != "tail"
        ):
            raise ValueError("[draft] needs the fused graph with logits 'tail' (and no [static])")
        texts = (
            ("trim_vocab", self.trim_vocab),
            ("prune", self.prune),
            ("distill", self.distill),
            ("draft", self.draft),
            ("evaluate", self.evaluate),
        )
        for name, section in texts:
            if section is not None and section.text is None:
                raise ValueError(f"{name}.text: give the text file this stage reads (no default)")
        if self.fuse is not None and (self.to_onnx.graph == "optimum" or self.static is not None):
            raise ValueError("[fuse] options are for the fused graph: to_onnx.graph 'fused' (or 'auto')")
        if self.quantize.mode == "qdq" and self.quantize.calib_text is None:
            raise ValueError("quantize.calib_text: mode 'qdq' calibrates on text; give the file")
        ev = self.evaluate
        if ev is None:
            return
        for stage_name, cfg in (
            ("distill", self.distill),
            ("prune", self.prune),
            ("trim_vocab", self.trim_vocab),
            ("draft", self.draft),
        ):
            if cfg is None or not same_file(cfg.text, ev.text):
                continue
            if overlaps(cfg.span, ev.span):
                raise ValueError(
                    f"evaluate.span {list(ev.span)} overlaps {stage_name}.span {list(cfg.span)} of the same "
                    f"text file: evaluation must use held-out text"
                )
        d = self.distill
        if d is not None and d.chat_tokens and ev.chat_tokens and d.seed == ev.chat_seed:
            raise ValueError(
                f"evaluate.chat_seed {ev.chat_seed} equals distill.seed: the chat turns evaluated on "
                f"would be the ones distillation trained on"
            )
        teaches_chats = d is not None and (d.chat_tokens or d.questions is not None)
        if (
            teaches_chats
            and ev.qa is not None
            and (d.exclude_qa is None or not same_file(d.exclude_qa, ev.qa))
        ):
            raise ValueError(
                f"distill trains on teacher-written chats while evaluate asks {ev.qa}: set "
                f"distill.exclude_qa to that file, so its questions are not trained on"
            )
        if (
            self.quantize.mode == "qdq"
            and self.quantize.calib_text is not None
            and same_file(self.quantize.calib_text, ev.text)
            and overlaps(self.quantize.calib_span, ev.span)
        ):
            raise ValueError("quantize.calib_span overlaps evaluate.span of the same text file")
        f = self.fuse
        if (
            f is not None
            and f.kv_cache != "fp32"
            and f.calib_text is not None
            and same_file(f.calib_text, ev.text)
            and overlaps(f.calib_span, ev.span)
        ):
            raise ValueError("fuse.calib_span overlaps evaluate.span of the same text file")


def load_recipe(path: str | Path) -> Recipe:
    return load_toml(path, Recipe)


# The pipeline after load, in order: (recipe section, stage). A section that is None is skipped.
STAGES: list[tuple[Callable[[Recipe], Any], stage.Stage]] = [
    (lambda r: r.trim_vocab, trim_vocab_stage.STAGE),
    (lambda r: r.prune, prune_stage.STAGE),
    (lambda r: r.distill, distill_stage.STAGE),
    (lambda r: r.to_onnx, to_onnx_stage.STAGE),
    (lambda r: r.quantize, quantize_stage.STAGE),
    (lambda r: r.fuse, variants_stage.STAGE),
    (lambda r: r.draft, draft_stage.STAGE),  # after quantize: trained against the shipped graph
    (lambda r: r.static, fix_shapes_stage.STAGE),
    (targets.compile_config, compile_qnn_stage.STAGE),  # target qnn-htp only
]
# Outputs that are HF folders (evaluated with stage_evals).
HF_STAGES = ("load", "trim_vocab", "prune", "distill")


def run(recipe: Recipe, out_dir: Path, progress: bool = False) -> Path:
    """Run every stage of `recipe` and write the bundle (with its report) to `out_dir`; then
    bring the stage cache back under its bound (sparing what this and other live runs use).
    `progress`: progress bars and one line per stage on stderr."""
    limit = cache.max_bytes()  # a bad EDGE_LLM_CACHE_MAX_GB fails before any work
    with cache.running() as started:
        out = _run(resolve(recipe), out_dir, progress)
        for e in cache.evict(limit, used_since=started):
            log.info("cache: removed %s (%.0f MiB, least recently used)", e.path.name, e.bytes / 2**20)
    return out


def resolve(recipe: Recipe) -> Recipe:
    """`recipe` with "auto" choices that depend only on the recipe made."""
    recipe = targets.adapt(recipe)  # what the target needs (graph, quantization) filled in
    standard_ops = recipe.quantize.mode in ("dynamic", "qdq") or recipe.static is not None
    if recipe.to_onnx.graph == "auto" and standard_ops:
        # ORT's dynamic / QDQ quantizers, fixed shapes (and the NPUs both are for) need standard ops.
        return replace(recipe, to_onnx=replace(recipe.to_onnx, graph="optimum"))
    if recipe.to_onnx.graph == "fused" and recipe.quantize.mode in ("dynamic", "qdq"):
        raise ExportError(f"quantize.mode {recipe.quantize.mode!r} needs to_onnx.graph 'optimum'")
    return recipe


def _loaded(recipe: Recipe, stages: StageLog) -> Artifact:
    """The load stage's artifact: the chain every later stage's cache key starts from."""
    t = time.perf_counter()
    loaded = load_stage.run(recipe.load)
    stages.add("load", time.perf_counter() - t, loaded.cached, source=loaded.source.get("name"))
    key_parts = (recipe.load, loaded.source)
    return Artifact(stable_key(*key_parts), key_parts, loaded.source, loaded.hf_dir, loaded.hf_dir)


def hf_model(recipe: Recipe, progress: bool = False) -> Path:
    """The HF folder the recipe's HF stages (load, trim_vocab, prune, distill) end with, cached
    under the same keys as a whole run (which then reuses them): a pruned shape can be measured
    in torch before any ONNX export (benchmarks/prune_tradeoff.py --torch)."""
    stages = StageLog(echo=progress)
    art = _loaded(recipe, stages)
    for section, st in STAGES:
        if st.name not in HF_STAGES:
            break  # the HF stages come first
        config = section(recipe)
        if config is not None:
            art = stage.run(st, config, art, stages, progress)
    return art.hf_dir


def _run(recipe: Recipe, out_dir: Path, progress: bool) -> Path:
    stages = StageLog(echo=progress)
    t_all = time.perf_counter()
    art = _loaded(recipe, stages)
    if recipe.prune is not None:
        prune_stage.check_model(recipe.prune, art.hf_dir)  # impossible ratios fail before work
    art = _evaluate(recipe, art, stages, progress)
    for section, st in STAGES:
        config = section(recipe)
        if config is None:
            continue
        art = stage.run(st, config, art, stages, progress)
        if st.name in HF_STAGES:
            art = _evaluate(recipe, art, stages, progress)

    bcfg = replace(recipe.bundle, name=recipe.bundle.name if recipe.bundle.name != "model" else recipe.name)
    layout = dict(art.layout)
    context = layout.pop("context_length", 0)
    if layout.get("kv_layout") != "static":  # a static graph serves exactly its past
        context = bcfg.context_length or context
    bcfg = replace(bcfg, context_length=context)

    def write_bundle(extra: dict[str, Path]) -> Path:
        assert art.graph is not None  # to_onnx always runs
        return bundle_stage.run(
            bcfg,
            bundle_stage.BundleInputs(
                graph=art.graph,
                hf_dir=art.hf_dir,
                layout=layout,
                quantization=art.quantization["method"],
                source=art.source,
                recipe={**evaluate_stage.jsonable(asdict(recipe)), "stages": stages.stages},
                extra_files={**art.extra_graphs, **_vocab_map(art.hf_dir), **extra},
                target=recipe.target.name,
            ),
            out_dir,
        )

    t = time.perf_counter()
    out = write_bundle({})
    # The target's provider options (openvino: precision ACCURACY) change what an evaluation on
    # that EP measures; a target without any keeps the key it had before they existed.
    opts = targets.provider_options(recipe.target.name)
    key = stable_key(art.key, bcfg, opts) if opts else stable_key(art.key, bcfg)
    art = replace(art, key=key, key_parts=(), last="bundle", bundle=out)
    stages.add("bundle", time.perf_counter() - t, False, path=str(out))
    art = _evaluate(recipe, art, stages, progress)
    t = time.perf_counter()
    # The report lists itself: its row goes in first, its time is filled in once it is written.
    stages.stages.append({"stage": "report", "seconds": 0.0, "cached": False})
    stages.stages[-1]["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report_dir = out.with_name(out.name + ".report")
    facts = {"name": bcfg.name, "stages": stages.stages, "evaluations": art.evaluations}
    files = report_stage.run(recipe.report, {**facts, "quantization": art.quantization}, report_dir)
    stages.stages[-1]["seconds"] = round(time.perf_counter() - t, 2)
    stages.say("report", time.perf_counter() - t, False)
    out = write_bundle(files)
    for f in files.values():
        f.unlink()
    report_dir.rmdir()
    return out


def _vocab_map(hf_dir: Path) -> dict[str, Path]:
    """A trimmed vocabulary's map to the teacher's ids travels in the bundle: evaluation compares
    the bundle with the teacher through it (the runtime does not read it)."""
    path = hf_dir / trim_vocab_stage.MAP
    return {path.name: path} if path.is_file() else {}


def _evaluate(recipe: Recipe, art: Artifact, stages: StageLog, progress: bool) -> Artifact:
    """`art` with its newest model evaluated (cached like a stage); unchanged without [evaluate],
    and for intermediate HF models without report.stage_evals."""
    cfg = recipe.evaluate
    if cfg is None or (art.bundle is None and not recipe.report.stage_evals):
        return art
    # The loaded model is the teacher itself; intermediate models are compared with it only
    # when report.stage_teacher asks (it doubles their cost); the bundle always is.
    if art.last == "load" or (art.bundle is None and not recipe.report.stage_teacher):
        teacher = None
    else:
        teacher = art.teacher
    task = evaluate_stage.EvaluateTask(cfg, teacher)
    return stage.run(evaluate_stage.STAGE, task, art, stages, progress, name=f"evaluate_{art.last}")
