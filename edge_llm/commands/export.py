"""`edge-llm export` (model or recipe -> bundle). Needs the `export` extra (torch, optimum)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="build a bundle from a model (hub id, HF folder, .gguf) or a recipe")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="hub id, local HF folder, .gguf file, or 'smollm2' (default)")
    src.add_argument("--recipe", help="recipe TOML (configs/recipes/NAME.toml)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--quant", choices=("int8", "none"), help="quantization (default int8)")
    p.add_argument("--name", help="bundle name (default: from the recipe or the model)")
    p.set_defaults(handler=run)


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
    out = recipe_mod.run(recipe, Path(args.out))
    print(f"bundle written: {out}")
    return 0
