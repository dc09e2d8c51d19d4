"""Where does the INT8 bundle lose the teacher's answers? QA retained and decode speed per
quantization setting, on the same fp32 graph.

Each variant is the default recipe (`configs/recipes/smollm2-int8.toml`: fused graph) with its
`[quantize]` section changed and no `[fuse]` / `[evaluate]` (the QA runs the main graph only);
load and to_onnx come from the stage cache, so a variant costs one quantize stage. Per variant,
through the runtime: the QA set's retention of the teacher's correct answers (only those
questions are asked, as in benchmarks/prune_tradeoff.py), held-out perplexity, bundle size, and
decode tok/s interleaved with the first variant (benchmarks/compare.py).

    python benchmarks/quant_qa.py --teacher-qa EVAL.json [--variants default acc0 emb_fp32 ...]

Writes benchmarks/results/quant_qa.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import interleaved  # noqa: E402
from benchmarks.prune_tradeoff import common_args, teacher_known, teacher_rows  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402
from export import evaluate  # noqa: E402
from export import recipe as recipe_mod  # noqa: E402

# name: [quantize] keys changed from the default recipe's (int8, block 64, accuracy_level 4 =
# int8 activations inside MatMulNBits, int8 embeddings).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "acc0": {"accuracy_level": 0},  # fp32 activations (the weights dequantized in the kernel)
    "head_acc0": {"exact_activations": ("lm_head",)},  # fp32 activations in the LM head only
    "down_acc0": {"exact_activations": ("down_proj",)},  # ... in the MLP down projections only
    "emb_fp32": {"embeddings": "fp32"},  # the token table unquantized (the tied head stays int8)
    "b32": {"block_size": 32},
    "b32_acc0": {"block_size": 32, "accuracy_level": 0},
    "grid": {"mode": "grid"},  # the GGUF's own 4-bit codes: the teacher's exact weights
    "grid_acc0": {"mode": "grid", "accuracy_level": 0},
    "fp32": {"mode": "none", "embeddings": "fp32"},
}


def build(name: str, work: Path) -> Path:
    base = recipe_mod.load_recipe(ROOT / "configs" / "recipes" / "smollm2-int8.toml")
    quant = replace(base.quantize, **VARIANTS[name])
    recipe = replace(base, name=f"quant-{name}", quantize=quant, fuse=None, evaluate=None)
    return recipe_mod.run(recipe, work / name, progress=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    common_args(ap, tokens=2048, threads=1, out="quant_qa")
    args = ap.parse_args(argv)
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown or not args.variants:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundles = {n: build(n, work) for n in args.variants}
        _, kept_file, teacher = teacher_known(teacher_rows(args.teacher_qa, args.qa), args.qa, work)
        cfg = evaluate.EvaluateConfig(
            text=Path(args.text), max_tokens=args.tokens, teacher=False, speed=False, qa=kept_file,
            threads=args.threads,
        )  # fmt: skip
        for n in args.variants:
            t0 = time.perf_counter()
            r = evaluate.run(cfg, bundles[n], None, progress=False, teacher_qa=teacher)
            lost = [i["question"] for i in r.pop("qa_items") if not i["ok"]]
            rows.append({"variant": n, "quantize": VARIANTS[n], "lost": lost, **r})
            print(f"{n}: {evaluate.headline(r)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        speeds = interleaved([bundles[n] for n in args.variants], args.rounds, 128, args.threads)
    for row, s in zip(rows, speeds, strict=True):
        row |= {"decode_tok_s": s["decode_tok_s"], "decode_x_first": s["ratio_to_first"]}
        row["decode_runs"] = s["decode_runs"]
    doc = {"qa": str(args.qa), "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads}
    doc["rows"] = rows
    first = rows[0]
    lines = [
        f"Quantization of the default recipe's fused graph. QA: `{args.qa.name}`, the "
        f"{first['qa_teacher_correct']} questions the teacher answers correctly asked. Perplexity: "
        f"first {args.tokens} tokens of the held-out span, ctx 512. Decode: {args.rounds} interleaved "
        f"rounds, 128 tokens, {args.threads} thread(s), shared CPU, ratio to `{first['variant']}`.",
        "",
        "| variant | quantize | size MiB | perplexity | QA retained | retained exact | decode tok/s "
        "| decode x first |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        keys = ", ".join(f"{k}={v}" for k, v in r["quantize"].items()) or "(as the default recipe)"
        lines.append(
            f"| {r['variant']} | {keys} | {r['size_bytes'] / 2**20:.1f} | {r['perplexity']:.3f} "
            f"| {r['qa_retained_count']}/{r['qa_teacher_correct']} = {100 * r['qa_retained']:.1f}% "
            f"| {100 * (r['qa_retained_exact'] or 0):.1f}% | {r['decode_tok_s']:.1f} "
            f"| {r['decode_x_first']:.3f} |"
        )
    lines += ["", "Questions lost (of those the teacher answers correctly):", ""]
    lines += [f"- {r['variant']}: {'; '.join(r['lost']) or 'none'}" for r in rows]
    write_results(Path(args.out), doc, lines)
    return rows


if __name__ == "__main__":
    main()
