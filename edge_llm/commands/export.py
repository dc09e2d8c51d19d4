"""`edge-llm export` (model or recipe -> bundle). Needs the `export` extra (torch, optimum)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUANT_MODES = ("int8", "grid", "dynamic", "qdq", "none")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="build a bundle from a model (hub id, HF folder, .gguf) or a recipe")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="hub id, local HF folder, .gguf file, or 'smollm2' (default)")
    src.add_argument("--recipe", help="recipe TOML (configs/recipes/NAME.toml)")
    p.add_argument("--out", required=True, help="bundle folder to write")
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
        "--target",
        choices=("cpu", "openvino", "qnn-htp", "cuda"),
        help="onnxruntime build the bundle is for: picks the graph it runs well (default: the recipe's, cpu)",
    )
    p.set_defaults(handler=run)

    e = sub.add_parser("eval", help="perplexity (and size, speed) of a bundle or HF folder on a text file")
    e.add_argument("--bundle", required=True, help="bundle folder (or a Hugging Face model folder)")
    e.add_argument("--text", required=True, help="text file (relative paths: cwd, then the repo root)")
    e.add_argument("--json", help="also write the full result as JSON to this file")
    e.add_argument("--span", default="0,1", help="fraction of the file's characters: START,END (0,1)")
    e.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens (8192)")
    e.add_argument("--context", type=int, default=512, help="window length in tokens (512)")
    e.add_argument("--stride", type=int, default=512, help="window step in tokens (512: no overlap)")
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
    try:
        from export import recipe as recipe_mod
    except ImportError as exc:
        print(
            f"edge-llm: export needs the export extra (pip install 'edge-llm[export]'): {exc}",
            file=sys.stderr,
        )
        return 2
    from dataclasses import replace

    from export.load import LoadConfig
    from export.quantize import QuantizeConfig

    recipe = recipe_mod.load_recipe(args.recipe) if args.recipe else recipe_mod.Recipe(name="smollm2-int8")
    if args.model:
        name = args.name or Path(args.model).stem.replace("/", "-")
        recipe = replace(recipe, load=LoadConfig(model=args.model), name=name)
    if args.quant:
        recipe = replace(recipe, quantize=QuantizeConfig(**{**recipe.quantize.__dict__, "mode": args.quant}))
        if not args.name and not args.recipe:
            recipe = replace(recipe, name=f"{recipe.name.removesuffix('-int8')}-{args.quant}")
    if args.name:
        recipe = replace(recipe, name=args.name)
    if args.graph:
        recipe = replace(recipe, to_onnx=replace(recipe.to_onnx, graph=args.graph))
    if args.target:
        from export.targets import TargetConfig

        recipe = replace(recipe, target=TargetConfig(args.target))
        if not args.graph:  # the target picks the graph, whatever the recipe's cpu default says
            recipe = replace(recipe, to_onnx=replace(recipe.to_onnx, graph="auto"))
    if args.static:
        from edge_llm.errors import ConfigError
        from export.fix_shapes import FixShapesConfig

        try:
            past, prefill = (int(x) for x in args.static.split(","))
        except ValueError:
            raise ConfigError(f"export --static {args.static!r}: give PAST,PREFILL, e.g. 512,64") from None
        try:
            recipe = replace(recipe, static=FixShapesConfig(past_length=past, prefill_length=prefill))
        except ValueError as exc:
            raise ConfigError(f"export --static: {exc}") from None
    out = recipe_mod.run(recipe, Path(args.out), progress=True)
    print(f"bundle written: {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    try:
        from export import evaluate
    except ImportError as exc:
        print(f"edge-llm: eval needs the export extra: {exc}", file=sys.stderr)
        return 2
    from edge_llm.errors import ConfigError

    text = Path(args.text).expanduser()
    if not text.is_absolute() and text.is_file():
        text = text.resolve()
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
        )
    except ValueError as exc:
        raise ConfigError(f"eval: {exc}") from None
    if args.chat_tokens and not args.teacher:
        raise ConfigError("eval: --chat-tokens needs --teacher (the teacher writes and scores the chats)")
    teacher = Path(args.teacher) if args.teacher else None
    result = evaluate.run(config, Path(args.bundle), teacher, progress=sys.stderr.isatty())
    print(evaluate.headline(result))
    if args.json:
        evaluate.save(result, Path(args.json))
        print(f"written: {args.json}")
    return 0
