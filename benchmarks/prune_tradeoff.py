"""The trade-off curve: parameters vs QA retained vs perplexity vs decode speed, per pruning level.

Each level is the default recipe (`configs/recipes/smollm2-int8.toml`: fused graph, INT8 weights
and embeddings) with a `[trim_vocab]` and/or `[prune]` section in front: the vocabulary cut to the
most used tokens (export/trim_vocab.py), whole layers dropped (the least-changing ones) or MLP
channels removed (activation-aware ranking, least-squares refit of down_proj), **without
distillation** (the recipe's distill stage is what recovers quality; this curve is the starting
point it recovers from, so a user can see which levels are worth distilling). Stages are cached
like any recipe's, so a rerun only evaluates. Level "p0" is the unpruned default bundle;
`--recipe-bundle B` adds a finished bundle (the distilled pruned recipe's) as one more row.

Per level, through the runtime (no torch): held-out perplexity (WikiText-2 valid, first 10%)
and bits per byte (what compares levels whose tokenizers differ),
the QA set's accuracy and the fraction of the teacher's correct answers retained (export/qa.py),
and decode tok/s interleaved with p0 (benchmarks/compare.py: ratios survive a shared CPU's drift
better than absolute figures). The teacher's answers come from `--teacher-qa FILE`, the JSON of
`edge-llm eval --bundle B --qa SET --teacher HF --json FILE` (or of `edge-llm eval --bundle HF
--qa SET`); without it the teacher answers here with torch.

    python benchmarks/prune_tradeoff.py --teacher-qa eval.json                 # every level
    python benchmarks/prune_tradeoff.py --levels p0 m17 m34 --tokens 2048 --rounds 3

Writes benchmarks/results/prune_tradeoff.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import interleaved  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402
from export import evaluate, qa  # noqa: E402
from export import recipe as recipe_mod  # noqa: E402
from export.prune import PruneConfig  # noqa: E402
from export.trim_vocab import TrimVocabConfig  # noqa: E402

# name: (vocabulary kept (0: all), decoder layers dropped, MLP ratio, query-head ratio).
# SmolLM2-135M: 30 layers of 3.54M parameters, a tied 49,152 x 576 embedding (28.3M, 21%); a
# vocabulary of 8,192 / 12,288 / 16,384 / 20,480 tokens (merge order, as the pruned recipe's
# [trim_vocab]) removes 17.6 / 15.8 / 14.0 / 12.3% of the parameters, each layer 2.6%, MLP
# ratio 0.17 about 10% (1536 channels = 79.6M; kept widths multiples of 32), a third of the query
# heads (head ratio 0.34: 2 of 3 per KV group kept) 4.9%. Layers are the first n of one greedy
# KL search on the unpruned model (`kl_order`: the same search for every level; the greedy
# choice of n layers is the first n steps of a longer search).
LEVELS: dict[str, tuple[int, int, float, float]] = {
    "p0": (0, 0, 0.0, 0.0),
    # one way at a time: where the knowledge goes
    "v8": (8192, 0, 0.0, 0.0),
    "v12": (12288, 0, 0.0, 0.0),
    "v16": (16384, 0, 0.0, 0.0),
    "v20": (20480, 0, 0.0, 0.0),
    "d3": (0, 3, 0.0, 0.0),
    "d5": (0, 5, 0.0, 0.0),
    "m17": (0, 0, 0.17, 0.0),
    "h34": (0, 0, 0.0, 0.34),
    # >= 25% fewer parameters, reached different ways
    "v8_d3": (8192, 3, 0.0, 0.0),
    "v12_d4": (12288, 4, 0.0, 0.0),
    "v16_d5": (16384, 5, 0.0, 0.0),
    "v20_d5": (20480, 5, 0.0, 0.0),
    "v20_m23": (20480, 0, 0.23, 0.0),
    "v16_h34_d3": (16384, 3, 0.0, 0.34),
    "v8_m13": (8192, 0, 0.13, 0.0),  # 1,344 channels kept: 24.9%, just short
    "v8_m15": (8192, 0, 0.15, 0.0),  # 1,312 kept
    "v7_m13": (7168, 0, 0.13, 0.0),  # v8_m13 with 1,024 tokens fewer: 25.3%
    "v12_m16": (12288, 0, 0.16, 0.0),  # 1,280 kept
    # further along the curve
    "v20_d3": (20480, 3, 0.0, 0.0),
    "v12_d6": (12288, 6, 0.0, 0.0),
    "v8_d8": (8192, 8, 0.0, 0.0),
    "m34": (0, 0, 0.34, 0.0),
    "m51": (0, 0, 0.51, 0.0),
    "m68": (0, 0, 0.68, 0.0),
}
DEFAULT_LEVELS = ["p0", "v20", "v20_d3", "v20_d5", "v12_d6", "v8_d8"]


def teacher_rows(path: Path | None, qa_file: Path) -> list[dict[str, Any]]:
    """The teacher's scored answers: from an eval JSON, or from torch (the export cache's, when
    the teacher has answered these questions before)."""
    questions = qa.load(qa_file)
    if path is not None:
        items = json.loads(Path(path).read_text())["qa_items"]
        rows = qa.teacher_rows(items) or items  # a --teacher run, or the teacher's own eval
        if [r["question"] for r in rows] != [q.question for q in questions]:
            raise SystemExit(f"{path}: its answers are for another QA set than {qa_file}")
        return qa.scored(questions, [r["answer"] for r in rows])  # rescored: the rule may be newer
    from export import load
    from export.teacher import load_model

    hf_dir = load.run(load.LoadConfig()).hf_dir  # the loaded teacher (cached)
    return qa.scored(questions, qa.answers_cached(lambda: load_model(hf_dir), hf_dir, questions, 32))


def teacher_known(
    teacher: list[dict[str, Any]], qa_file: Path, work: Path
) -> tuple[list[int], Path, list[dict[str, Any]]]:
    """Only the questions the teacher answers correctly are asked: retention is the same figure
    at a fraction of the cost (the QA accuracy is then over these). Returns their indices in the
    set, a QA file of them in `work`, and the teacher's rows for them."""
    known = [i for i, r in enumerate(teacher) if r["ok"]]
    records = [{"question": q.question, "answers": list(q.answers), "category": q.category}
               for q in qa.load(qa_file)]  # fmt: skip
    kept_file = work / "qa-teacher-correct.jsonl"
    kept_file.write_text("".join(json.dumps(records[i]) + "\n" for i in known))
    return known, kept_file, [teacher[i] for i in known]


def answers_from(folder: Path | None, level: str, questions: list[qa.Question]) -> list[str] | None:
    """A level's answers to the whole QA set from folder/qa_LEVEL.json, or None when absent."""
    path = None if folder is None else folder / f"qa_{level}.json"
    if path is None or not path.is_file():
        return None
    items = json.loads(path.read_text())["qa_items"]
    if [r["question"] for r in items] != [q.question for q in questions]:
        raise SystemExit(f"{path}: its answers are for another QA set")
    return [r["answer"] for r in items]


RECIPE = ROOT / "configs" / "recipes" / "smollm2-int8.toml"


def kl_order(args: argparse.Namespace) -> list[int]:
    """The layers one greedy KL search on the unpruned model drops (`--kl-depth` of them,
    `--kl-calib` calibration tokens), in the order it dropped them: a prune stage, cached like
    any recipe's (13 min for 5 layers on the loaded 2-core host, so every level reuses one)."""
    base = recipe_mod.load_recipe(RECIPE)
    n = json.loads((recipe_mod.hf_model(base) / "config.json").read_text())["num_hidden_layers"]
    cfg = PruneConfig(
        layer_ratio=round(args.kl_depth / n, 4), layer_method="kl", text=Path(args.text),
        span=(0.1, 1.0), calib_tokens=args.kl_calib, seq_len=512,
    )  # fmt: skip
    folder = recipe_mod.hf_model(replace(base, name="tradeoff-kl", prune=cfg, evaluate=None), progress=True)
    return [step["dropped"] for step in json.loads((folder / "prune.json").read_text())["layer_kl"]]


def level_recipe(name: str, shape: tuple[int, int, float, float], order: list[int], args: argparse.Namespace):
    """The default recipe (fused graph, INT8 weights and embeddings) with the level's
    [trim_vocab] / [prune] sections in front and no evaluation."""
    vocab, depth, mlp, heads = shape
    if depth > len(order):
        raise SystemExit(f"level {name} drops {depth} layers; the KL search gave {len(order)} (--kl-depth)")
    trim = None
    if vocab:  # as the pruned recipe's [trim_vocab] (merge order), so its cached stage is shared
        trim = TrimVocabConfig(size=vocab, prior=vocab, text=Path(args.text), span=(0.1, 1.0))
    prune = None
    if depth or mlp or heads:
        prune = PruneConfig(
            layers=tuple(order[:depth]), mlp_ratio=mlp, head_ratio=heads, text=Path(args.text),
            span=(0.1, 1.0), calib_tokens=args.calib_tokens,
        )  # fmt: skip
    base = recipe_mod.load_recipe(RECIPE)
    fuse = base.fuse  # its int8-KV calibration reads the same text file (--text: where it is)
    if fuse is not None and fuse.calib_text is not None:
        fuse = replace(fuse, calib_text=Path(args.text))
    return replace(base, name=f"tradeoff-{name}", trim_vocab=trim, prune=prune, fuse=fuse, evaluate=None)


def common_args(ap: argparse.ArgumentParser, tokens: int, threads: int, out: str) -> None:
    """The options this script shares with benchmarks/quant_qa.py (teacher, QA set, text, decode)."""
    ap.add_argument("--teacher-qa", type=Path, help="eval JSON holding the teacher's QA answers")
    ap.add_argument("--qa", type=Path, default=ROOT / "configs" / "qa" / "general-v1.jsonl")
    ap.add_argument("--text", default="../shared/data/wikitext-2/valid.txt", help="cwd, then the repo root")
    ap.add_argument("--tokens", type=int, default=tokens, help="held-out perplexity tokens (span 0..0.1)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--work", type=Path, help="where the bundles go (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", nargs="*", default=DEFAULT_LEVELS, help=f"of {list(LEVELS)}")
    ap.add_argument("--recipe-bundle", type=Path, help="a finished (distilled) bundle: one more row")
    ap.add_argument(
        "--qa-dir",
        type=Path,
        help="folder of `edge-llm eval --qa SET --json qa_LEVEL.json` results: those answers are rescored "
        "instead of asked again (a loaded machine: run the levels' QA in parallel processes)",
    )
    ap.add_argument(
        "--torch",
        action="store_true",
        help="measure the pruned HF models in torch (fp32) instead of INT8 bundles: no ONNX export, no "
        "decode speed; writes OUT_torch",
    )
    ap.add_argument(
        "--calib-tokens", type=int, default=8192, help="width-pruning calibration (the recipe's 8192)"
    )
    ap.add_argument(
        "--kl-depth", type=int, default=8, help="layers the one KL search drops (the deepest level)"
    )
    ap.add_argument("--kl-calib", type=int, default=1024, help="the KL search's calibration tokens")
    common_args(ap, tokens=8192, threads=2, out="prune_tradeoff")
    args = ap.parse_args(argv)
    unknown = [n for n in args.levels if n not in LEVELS]
    if unknown or not args.levels:
        ap.error(f"unknown levels {unknown}; known: {list(LEVELS)}")
    names = ["p0"] + [n for n in args.levels if n != "p0"]  # p0: the speed reference
    out = Path(args.out + ("_torch" if args.torch else ""))
    order = kl_order(args) if any(LEVELS[n][1] for n in names) else []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)  # --torch writes no bundle there, only the QA file
        recipes = {n: level_recipe(n, LEVELS[n], order, args) for n in names}
        if args.torch:
            models = {n: recipe_mod.hf_model(r, progress=True) for n, r in recipes.items()}
        else:
            models = {n: recipe_mod.run(r, work / n, progress=True) for n, r in recipes.items()}
        shapes = {n: LEVELS[n] for n in names}
        if args.recipe_bundle is not None:
            names.append("recipe")
            models["recipe"] = args.recipe_bundle
            shapes["recipe"] = (-1, -1, -1.0, -1.0)  # its own recipe says (bundle.json)
        questions = qa.load(args.qa)
        known, kept_file, teacher = teacher_known(teacher_rows(args.teacher_qa, args.qa), args.qa, work)
        kept = [questions[i] for i in known]
        cfg = evaluate.EvaluateConfig(
            text=Path(args.text), max_tokens=args.tokens, teacher=False, speed=False, qa=kept_file,
            threads=args.threads,
        )  # fmt: skip
        rows = []
        for n in names:
            t0 = time.perf_counter()
            given = answers_from(args.qa_dir, n, questions)
            if given is None:
                r = evaluate.run(cfg, models[n], None, progress=False, teacher_qa=teacher)
            else:
                r = evaluate.run(replace(cfg, qa=None), models[n], None, progress=False)
                r |= evaluate.qa_result(cfg, qa.scored(kept, [given[i] for i in known]), teacher)
            r.pop("qa_items")
            r["qa_file"] = str(args.qa)
            vocab, depth, mlp, heads = shapes[n]
            dropped = order[:depth] if depth >= 0 else None
            shape = {
                "level": n,
                "vocab": vocab,
                "layers_dropped": dropped,
                "mlp_ratio": mlp,
                "head_ratio": heads,
            }
            rows.append({**shape, **r, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{n}: {evaluate.headline(r)} ({time.perf_counter() - t0:.0f} s)", flush=True)
            save(rows, args, order, out, partial=True)  # minutes per level: keep what is measured
        if not args.torch:
            speeds = interleaved([models[n] for n in names], args.rounds, 128, args.threads)
            for row, sp in zip(rows, speeds, strict=True):
                row |= {"decode_tok_s": sp["decode_tok_s"], "decode_x_p0": sp["ratio_to_first"]}
                row["decode_runs"] = sp["decode_runs"]
    save(rows, args, order, out, partial=False)
    return rows


def save(
    rows: list[dict[str, Any]], args: argparse.Namespace, order: list[int], out: Path, partial: bool
) -> None:
    """JSON + Markdown (+ the plot once complete); `partial`: levels still to come, no decode yet."""
    doc = {"qa": str(args.qa), "tokens": args.tokens, "threads": args.threads, "torch": args.torch}
    doc |= {"rounds": None if args.torch else args.rounds, "calib_tokens": args.calib_tokens}
    doc |= {"kl_order": order, "kl_calib_tokens": args.kl_calib, "partial": partial, "rows": rows}
    write_results(out, doc, table(rows, args, order))
    if not partial:
        plot(rows, out.with_suffix(".png"), args.torch)


def table(rows: list[dict[str, Any]], args: argparse.Namespace, order: list[int]) -> list[str]:
    """The Markdown: what was measured how, then one row per level."""
    full, n_known = rows[0]["parameters"], rows[0]["qa_teacher_correct"]
    what = "fp32 HF models in torch" if args.torch else "fused INT8 bundles (int8 weights and embeddings)"
    lines = [
        f"No distillation (except the row `recipe`: the finished pruned recipe's bundle); {what}. "
        f"Layers dropped: the first n of one greedy KL search on the unpruned model "
        f"({args.kl_calib} calibration tokens), order {order}. Width pruning calibrated on "
        f"{args.calib_tokens} tokens. Perplexity (per token: compares rows with the same vocabulary only) "
        f"and bits per byte (compares all rows): first {args.tokens} tokens of the held-out span, ctx 512, "
        f"stride 512. QA: `{args.qa.name}`, the {n_known} questions the teacher answers correctly asked "
        f"(retained = correct / {n_known})."
        + ("" if args.torch else f" Decode: {args.rounds} interleaved rounds, 128 tokens, {args.threads} "
           f"threads, shared CPU (noisy)."),
        "",
    ]  # fmt: skip
    head = "| level | vocab | layers dropped | MLP | heads | params | removed | size MiB | perplexity "
    head += "| bits/byte | QA retained | retained exact | answers kept |"
    rule = "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if not args.torch:
        head, rule = head + " size x p0 | decode tok/s | decode x p0 |", rule + "---:|---:|---:|"
    lines += [head, rule]
    for r in rows:
        own = r["vocab"] < 0  # the recipe row: its shape is in its bundle.json
        bpb = f"{r['bits_per_byte']:.3f}" if "bits_per_byte" in r else "—"
        line = (
            f"| {r['level']} | {'see recipe' if own else (r['vocab'] or 49152)} "
            f"| {'' if own else (r['layers_dropped'] or '—')} | {'' if own else r['mlp_ratio'] or '—'} "
            f"| {'' if own else r['head_ratio'] or '—'} | {r['parameters'] / 1e6:.1f}M "
            f"| {1 - r['parameters'] / full:.1%} | {r['size_bytes'] / 2**20:.1f} | {r['perplexity']:.2f} "
            f"| {bpb} | {_pct(r['qa_retained'])} | {_pct(r['qa_retained_exact'])} "
            f"| {r['qa_correct']}/{r['qa_questions']} |"
        )
        if not args.torch:
            speed = f"{r['decode_tok_s']:.1f} | {r['decode_x_p0']:.3f}" if "decode_x_p0" in r else "— | —"
            line += f" {r['size_bytes'] / rows[0]['size_bytes']:.3f} | {speed} |"
        lines.append(line)
    return lines


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def plot(rows: list[dict[str, Any]], path: Path, torch: bool = False) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    x = [r["parameters"] / 1e6 for r in rows]
    panels = [
        ("QA retained (%)", [100 * (r["qa_retained"] or 0) for r in rows]),
        ("bits per byte (held-out)", [r.get("bits_per_byte", float("nan")) for r in rows]),
    ]
    if not torch:
        panels.append(("decode speed (x unpruned)", [r["decode_x_p0"] for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, ys) in zip(axes, panels, strict=True):
        ax.plot(x, ys, "o" if torch else "o-", color="#4c72b0")
        for xi, yi, r in zip(x, ys, rows, strict=True):
            ax.annotate(r["level"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(title)
        ax.set_xlabel("parameters (M)")
        ax.invert_xaxis()  # left to right: more pruning
    kind = "fp32 in torch" if torch else "INT8 bundles"
    distilled = " (row 'recipe': distilled)" if any(r["level"] == "recipe" for r in rows) else ""
    fig.suptitle(f"SmolLM2-135M pruned, {kind}, no distillation{distilled}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
