"""`edge-llm export` (model or recipe -> bundle). Needs the `export` extra (torch, optimum)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_llm.errors import ConfigError

QUANT_MODES = ("int8", "grid", "dynamic", "qdq", "none")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="build a bundle from a model (hub id, HF folder, .gguf) or a recipe")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="hub id, local HF folder, .gguf file, or 'smollm2' (default)")
    src.add_argument("--recipe", help="recipe TOML (configs/recipes/NAME.toml)")
    p.add_argument(
        "--out",
        help="bundle folder to write (default: $EDGE_LLM_CACHE/bundles/NAME-HASH, reused when it exists, "
        "and linked as the default bundle that other commands use without --bundle)",
    )
    p.add_argument("--quant", choices=QUANT_MODES, help="quantization (default int8)")
    p.add_argument("--name", help="bundle name (default: from the recipe or the model)")
    p.add_argument(
        "--graph",
        choices=("auto", "fused", "optimum"),
        help="ONNX graph: fused GQA (Llama-family) or optimum's export (default: the recipe's, auto)",
    )
    p.add_argument(
        "--static",
        metavar="PAST,PREFILL",
        help="also fix the shapes for NPUs: a decode and a PREFILL-token graph over PAST positions "
        "(optimum graph; quant qdq, dynamic or none), e.g. 512,64",
    )
    p.add_argument(
        "--calib-text",
        metavar="FILE",
        help="calibration text for --quant qdq (relative paths: cwd, then the repo root)",
    )
    p.add_argument(
        "--target",
        choices=("cpu", "openvino", "qnn-htp", "cuda"),
        help="onnxruntime build the bundle is for: picks the graph it runs well (default: the recipe's, cpu)",
    )
    p.set_defaults(handler=run)

    e = sub.add_parser(
        "eval", help="perplexity (and size, speed) of a bundle or HF folder on a text file, and/or a QA set"
    )
    e.add_argument("--bundle", help="bundle or Hugging Face model folder (default: the default bundle)")
    e.add_argument("--text", help="text file (relative paths: cwd, then the repo root)")
    e.add_argument(
        "--qa",
        metavar="FILE",
        help="QA set (JSON lines, e.g. configs/qa/general-v1.jsonl): greedy chat answers scored; "
        "with --teacher, the fraction of the teacher's correct answers kept",
    )
    e.add_argument("--json", help="also write the full result as JSON to this file")
    e.add_argument("--span", default="0,1", help="fraction of the file's characters: START,END")
    e.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens")
    e.add_argument("--context", type=int, default=512, help="window length in tokens")
    e.add_argument("--stride", type=int, default=512, help="window step in tokens (= --context: no overlap)")
    e.add_argument("--teacher", help="HF folder of a teacher: adds KL and top-1 agreement")
    e.add_argument(
        "--chat-tokens",
        type=int,
        default=0,
        help="with --teacher: also compare on the answers of ~N tokens of chat turns the teacher writes",
    )
    e.add_argument("--no-speed", action="store_true", help="skip the decode speed / TTFT measurement")
    e.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    e.add_argument("--provider", default="cpu", help="execution provider for a bundle (cpu, openvino, ...)")
    e.set_defaults(handler=run_eval)


def run(args: argparse.Namespace) -> int:
    import export

    # Before anything is downloaded or written: a runtime-only install would otherwise fetch the
    # model and fail on `import torch` minutes later, leaving .partial folders behind.
    absent = export.missing()
    if absent:
        print(
            f"edge-llm: export needs the export extra (missing: {', '.join(absent)}): {export.INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from export import recipe as recipe_mod

    recipe = recipe_mod.load_recipe(args.recipe) if args.recipe else recipe_mod.Recipe(name="smollm2-int8")
    try:  # the Recipe checks its sections as they are replaced; say which flag was wrong
        recipe = _with_flags(recipe, args)
    except ValueError as exc:
        raise ConfigError(f"export: {exc}") from None
    if args.out:
        out = recipe_mod.run(recipe, Path(args.out), progress=True)
        print(f"bundle written: {out}")
        return 0
    return export_default(args, recipe, recipe_mod.run)


def _with_flags(recipe: Any, args: argparse.Namespace) -> Any:
    """`recipe` with the command line's --model / --quant / --calib-text / --name / --graph /
    --static / --target applied, in one replace: the Recipe checks its sections against each other."""
    from export.fix_shapes import FixShapesConfig
    from export.load import LoadConfig

    load, name, static = recipe.load, recipe.name, recipe.static
    if args.model:
        load, name = LoadConfig(model=args.model), Path(args.model).stem.replace("/", "-")
    quant = recipe.quantize
    if args.calib_text:
        quant = replace(quant, calib_text=Path(args.calib_text))
    if args.quant:
        quant = replace(quant, mode=args.quant)
        if not args.recipe:
            name = f"{name.removesuffix('-int8')}-{args.quant}"
    if args.static:
        try:
            past, prefill = (int(x) for x in args.static.split(","))
        except ValueError:
            raise ValueError(f"--static {args.static!r}: give PAST,PREFILL, e.g. 512,64") from None
        static = FixShapesConfig(past_length=past, prefill_length=prefill)
    to_onnx = replace(recipe.to_onnx, graph=args.graph) if args.graph else recipe.to_onnx
    target = recipe.target
    if args.target:
        from export.targets import TargetConfig

        target = TargetConfig(args.target)
        if not args.graph:  # the target picks the graph, whatever the recipe's cpu default says
            to_onnx = replace(to_onnx, graph="auto")
    return replace(
        recipe,
        load=load,
        name=args.name or name,
        quantize=quant,
        static=static,
        to_onnx=to_onnx,
        target=target,
    )


def export_default(args: argparse.Namespace, recipe: Any, run_recipe: Any) -> int:
    """`edge-llm export` without --out: the bundle goes under the cache, in a folder named by the
    recipe's content (so an unchanged recipe is not rebuilt and two recipes never overwrite each
    other), and becomes the default bundle."""
    from edge_llm.bundle import load_bundle
    from edge_llm.errors import BundleError
    from edge_llm.paths import bundles_dir, link_default

    out = bundles_dir() / f"{recipe.name}-{_recipe_key(args, recipe)}"
    try:
        load_bundle(out, verify=False)
        print(f"bundle up to date: {out} (same recipe; delete it, or pass --out, to build it again)")
    except BundleError:  # absent, or left unfinished: build it
        out = run_recipe(recipe, out, progress=True)
        print(f"bundle written: {out}")
    print(f"default bundle: {link_default(out)} -> {out.name} (used when --bundle is omitted)")
    return 0


def _recipe_key(args: argparse.Namespace, recipe: Any) -> str:
    """The default bundle's folder key: the recipe as applied (flags included) and the graph
    writer's version, so a pipeline that now writes a different graph (e.g. 3: the portable GQA
    graph) builds a new bundle instead of calling an old one up to date. A padded graph also keys
    on the pad's version, as the variants stage's cache does: without it the query_pad switch
    (PAD_VERSION 2) found the always-padded bundle "up to date" and kept serving one row at a time."""
    from export.cache import stable_key
    from export.to_onnx import STAGE_VERSION
    from export.variants import PAD_VERSION

    versions: tuple[int, ...] = (STAGE_VERSION,)
    if recipe.fuse is not None and recipe.fuse.pad_query_row:
        versions += (PAD_VERSION,)
    return stable_key(recipe, *versions)[:12]


def run_eval(args: argparse.Namespace) -> int:
    try:
        from export import evaluate
    except ImportError as exc:
        print(f"edge-llm: eval needs the export extra: {exc}", file=sys.stderr)
        return 2
    from edge_llm.paths import resolve_bundle

    if not args.text and not args.qa:
        raise ConfigError("eval: give --text FILE, --qa FILE, or both")
    text, qa = _cwd_path(args.text), _cwd_path(args.qa)
    try:
        span = tuple(float(x) for x in args.span.split(","))
        config = evaluate.EvaluateConfig(
            text=text,
            span=span,  # type: ignore[arg-type]
            max_tokens=args.max_tokens,
            context=args.context,
            stride=args.stride,
            teacher=bool(args.teacher),
            chat_tokens=args.chat_tokens,
            speed=not args.no_speed,
            threads=args.threads,
            provider=args.provider,
            qa=qa,
        )
    except ValueError as exc:
        raise ConfigError(f"eval: {exc}") from None
    if args.chat_tokens and not args.teacher:
        raise ConfigError("eval: --chat-tokens needs --teacher (the teacher writes and scores the chats)")
    teacher = Path(args.teacher) if args.teacher else None
    result = evaluate.run(config, resolve_bundle(args.bundle), teacher, progress=sys.stderr.isatty())
    print(evaluate.headline(result))
    if args.json:
        evaluate.save(result, Path(args.json))
        print(f"written: {args.json}")
    return 0


def _cwd_path(arg: str | None) -> Path | None:
    """A file argument as given; relative ones that exist under cwd made absolute (the
    evaluation also looks under the repo root, export/text.py)."""
    if not arg:
        return None
    path = Path(arg).expanduser()
    return path.resolve() if not path.is_absolute() and path.is_file() else path
