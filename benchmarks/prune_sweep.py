"""Which structured pruning loses least before distillation? Prune the teacher several ways, measure.

In: a loaded HF model folder (default: the embedded SmolLM2, built/cached by `export.load`), the
calibration span and the held-out evaluation span of a text file. Out: for each candidate
(layer / MLP / head / KV-group ratios) the parameter count, the fraction removed and the
perplexity of the pruned model *before* any distillation (torch fp32, sliding window), printed
and written to `benchmarks/results/prune_sweep.{json,md}`.

The post-pruning perplexity is a proxy: distillation recovers part of the loss, and the ranking
after distillation can differ, but a candidate that starts far behind rarely catches up within a
CPU-sized token budget.

    python benchmarks/prune_sweep.py                      # every candidate
    python benchmarks/prune_sweep.py --only d4_m30 m45     # some
    python benchmarks/prune_sweep.py --add x:0.1,0.3,0.33,0  # name:layer,mlp,head,kv ratios
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from export import evaluate, load, prune  # noqa: E402

# name: (layer_ratio, mlp_ratio, head_ratio, kv_ratio); SmolLM2-135M has 30 layers, 1536 MLP
# channels, 9 query heads in 3 KV groups. Each removes >= 25% of the parameters.
CANDIDATES: dict[str, tuple[float, float, float, float]] = {
    "d7_m30": (0.234, 0.30, 0.0, 0.0),
    "d4_m30": (0.134, 0.30, 0.0, 0.0),
    "d10": (0.334, 0.0, 0.0, 0.0),
    "m45": (0.0, 0.45, 0.0, 0.0),
    "m35_h33": (0.0, 0.35, 0.34, 0.0),
    "d2_m35": (0.067, 0.35, 0.0, 0.0),
    "m30_kv33": (0.0, 0.32, 0.0, 0.34),
}


def measure(name: str, ratios: tuple[float, ...], hf_dir: Path, ids, refit: bool, args) -> dict:
    layer, mlp, head, kv = ratios
    method = args.method
    cfg = prune.PruneConfig(
        reconstruct=refit,
        layer_ratio=layer,
        layer_method=method,
        mlp_ratio=mlp,
        head_ratio=head,
        kv_ratio=kv,
        text=Path(args.text),
        calib_tokens=args.calib_tokens,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = prune.run(cfg, hf_dir, Path(tmp) / "pruned")
        logits, _ = evaluate.torch_logits(Path(tmp) / "pruned")
        result = evaluate.score(ids, logits, args.context, args.context)
    return {
        "name": name,
        "layer_ratio": layer,
        "layer_method": method,
        "mlp_ratio": mlp,
        "head_ratio": head,
        "kv_ratio": kv,
        "refit": refit,
        "parameters": report["parameters_after"],
        "removed": 1 - report["parameters_after"] / report["parameters_before"],
        "perplexity": result["perplexity"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default="../shared/data/wikitext-2/valid.txt", help="cwd, then the repo root")
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (held-out span 0..0.1)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--method", choices=("single", "block"), default="single")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument(
        "--refit",
        choices=("on", "off", "both"),
        default="both",
        help="least-squares refit of pruned projections",
    )
    ap.add_argument("--add", nargs="*", default=[], help="name:layer,mlp,head,kv")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_sweep"))
    args = ap.parse_args()

    cands = dict(CANDIDATES)
    for spec in args.add:
        name, _, ratios = spec.partition(":")
        values = tuple(float(x) for x in ratios.split(","))
        if len(values) != 4:
            ap.error(f"--add {spec!r}: want name:layer,mlp,head,kv")
        cands[name] = values
    names = args.only if args.only else list(cands)
    unknown = [n for n in names if n not in cands]
    if unknown:
        ap.error(f"unknown candidates {unknown}; known: {sorted(cands)}")

    hf_dir = load.run(load.LoadConfig()).hf_dir
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ecfg = evaluate.EvaluateConfig(text=Path(args.text), max_tokens=args.tokens, context=args.context)
    ids, where = evaluate.tokenize_span(ecfg, lambda s: tok.encode(s, add_special_tokens=False).ids)
    logits, _ = evaluate.torch_logits(hf_dir)
    base = evaluate.score(ids, logits, args.context, args.context)["perplexity"]
    print(f"teacher perplexity {base:.3f} on {len(ids)} tokens of {where['file']}", flush=True)
    rows = []
    refits = {"on": [True], "off": [False], "both": [False, True]}[args.refit]
    for name, refit in [(n, r) for n in names for r in refits]:
        row = measure(name, cands[name], hf_dir, ids, refit, args)
        row["ratio_to_teacher"] = row["perplexity"] / base
        rows.append(row)
        print(
            f"{name:12s} refit {'on ' if refit else 'off'} "
            f"params {row['parameters'] / 1e6:6.1f}M (-{row['removed']:.1%})  "
            f"ppl {row['perplexity']:9.2f} ({row['ratio_to_teacher']:.2f}x)  {row['seconds']}s",
            flush=True,
        )
    doc = {"teacher_perplexity": base, "eval": where, "calib_tokens": args.calib_tokens, "rows": rows}
    lines = [
        f"Teacher perplexity {base:.3f} ({len(ids)} tokens, context {args.context}); no distillation.",
        "",
        "| candidate | layers | MLP | heads | KV | refit | params | removed | ppl | x teacher |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['layer_ratio']} ({r['layer_method']}) | {r['mlp_ratio']} "
            f"| {r['head_ratio']} | {r['kv_ratio']} | {'yes' if r['refit'] else 'no'} "
            f"| {r['parameters'] / 1e6:.1f}M | {r['removed']:.1%} "
            f"| {r['perplexity']:.2f} | {r['ratio_to_teacher']:.2f} |"
        )
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
