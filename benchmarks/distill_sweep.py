"""Which distillation settings recover a pruned model fastest? Same student, same token budget.

In: a recipe with [prune] and [distill] (default `configs/recipes/smollm2-pruned-int8.toml`; its
load and prune stages come from the stage cache, built if missing) and variants, each a set of
`[distill]` overrides. Out: per variant the student's held-out perplexity after `--tokens`
training tokens (the recipe's eval span), its training tok/s, and the ratio to the teacher's
perplexity, printed and written to `benchmarks/results/distill_sweep.{json,md}`.

    python benchmarks/distill_sweep.py --tokens 20480 \
        --variant base: --variant lr1e-3:lr=1e-3 --variant ce:ce_weight=0.5
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from export import distill, evaluate, load, prune, recipe  # noqa: E402
from export.cache import cached_stage, stable_key  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = ast.literal_eval(value.strip())
    return name, overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "recipes" / "smollm2-pruned-int8.toml"))
    ap.add_argument("--tokens", type=int, default=20480, help="training tokens per variant")
    ap.add_argument("--variant", action="append", required=True, help="name:key=value,key=value")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_sweep"))
    args = ap.parse_args()
    rec = recipe.load_recipe(args.recipe)
    if rec.prune is None or rec.distill is None:
        ap.error(f"{args.recipe} needs [prune] and [distill]")
    variants = [parse_variant(v) for v in args.variant]

    loaded = load.run(rec.load)
    key = stable_key(stable_key(rec.load, loaded.source), rec.prune)
    pcfg = rec.prune
    student, _ = cached_stage("prune", key, lambda out: prune.run(pcfg, loaded.hf_dir, out))
    base_cfg = replace(rec.distill, tokens=args.tokens, max_minutes=0.0)
    held_out = distill.held_out_ids(replace(base_cfg, eval_every=1), distill.load_tokenizer(loaded.hf_dir))
    logits, _ = evaluate.torch_logits(loaded.hf_dir)
    teacher_ppl = evaluate.score(held_out, logits, base_cfg.eval_context, base_cfg.eval_context)["perplexity"]
    print(f"teacher perplexity {teacher_ppl:.3f}; student from {student}", flush=True)
    rows = []
    for name, overrides in variants:
        cfg = replace(base_cfg, eval_every=10**9, **overrides)  # curve: first and last point only
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rep = distill.run(cfg, loaded.hf_dir, student, Path(tmp) / "d", progress=False)
            # Agreement with the teacher: a student fitted to the text (ce_weight) can beat the
            # teacher's perplexity on that text while agreeing with it less.
            trained, _ = evaluate.torch_logits(Path(tmp) / "d")
            agree = evaluate.score(held_out, trained, cfg.eval_context, cfg.eval_context, teacher=logits)
        first, last = rep["curve"][0], rep["curve"][-1]
        row = {
            "name": name,
            "overrides": overrides,
            "tokens": rep["tokens_trained"],
            "train_tok_s": rep["tokens_trained"] / rep["seconds"],
            "perplexity_before": first["perplexity"],
            "perplexity": last["perplexity"],
            "ratio_to_teacher": last["perplexity"] / teacher_ppl,
            "kl_to_teacher": agree["kl_to_teacher"],
            "top1_agreement": agree["top1_agreement"],
            "last_loss": rep["last_loss"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(
            f"{name:12s} {overrides}  ppl {row['perplexity_before']:.2f} -> {row['perplexity']:.2f} "
            f"({row['ratio_to_teacher']:.2f}x)  KL {row['kl_to_teacher']:.3f}  "
            f"top-1 {row['top1_agreement']:.3f}  "
            f"{row['train_tok_s']:.0f} tok/s",
            flush=True,
        )
    doc = {"recipe": args.recipe, "teacher_perplexity": teacher_ppl, "tokens": args.tokens, "rows": rows}
    lines = [
        f"Student: {Path(args.recipe).name} after pruning; {args.tokens} training tokens per variant; "
        f"teacher perplexity {teacher_ppl:.3f} (held-out span, context {base_cfg.eval_context}).",
        "",
        "| variant | overrides | ppl before | ppl after | x teacher | KL to teacher | top-1 | train tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['overrides'] or '-'} | {r['perplexity_before']:.2f} | {r['perplexity']:.2f} "
            f"| {r['ratio_to_teacher']:.2f} | {r['kl_to_teacher']:.3f} | {r['top1_agreement']:.3f} "
            f"| {r['train_tok_s']:.0f} |"
        )
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
