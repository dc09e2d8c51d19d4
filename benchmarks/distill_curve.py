"""How much of the teacher comes back per distillation token: one long distillation of a recipe's
pruned student with snapshots, and each snapshot measured as the recipe's evaluation does.

    # 1. train: the recipe's [distill] with overrides, a snapshot at each --save-at token count
    python benchmarks/distill_curve.py train --recipe R.toml --out RUN \\
        --set teacher_topk=128 --set autocast='"auto"' --set max_minutes=75.0 --save-at 65536 131072
    # 2. measure every snapshot in RUN (and the final student; --watch: as they appear)
    python benchmarks/distill_curve.py measure --recipe R.toml --run RUN \
        --out benchmarks/results/distill_curve

`train` writes RUN/at-<tokens>/ (export/distill.py `save_at`) and the final student in RUN.
`measure` scores each with the recipe's [evaluate] section in torch (fp32, no ONNX): held-out
perplexity and bits per byte, KL / top-1 against the teacher on the text and on the answers of
the teacher's own chats (written once, seed `chat_seed`), and QA retention: the questions the
teacher answers correctly (its cached answers), asked greedily (export/qa.py). Results go to
OUT.{json,md} after every snapshot. Snapshots are taken mid-run (at the learning rate of that
moment), not from runs that ended there.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.prune_tradeoff import teacher_known, teacher_rows  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402
from export import distill, evaluate, load, qa, recipe  # noqa: E402
from export.teacher import chats as teacher_chats  # noqa: E402
from export.teacher import torch_logits  # noqa: E402
from export.text import resolve_text  # noqa: E402


def models(rec: recipe.Recipe) -> tuple[Path, Path]:
    """(teacher, pruned student) HF folders of the recipe, from the stage cache (built if missing)."""
    teacher = load.run(rec.load).hf_dir
    return teacher, recipe.hf_model(replace(rec, distill=None, evaluate=None), progress=True)


def train(args: argparse.Namespace) -> None:
    rec = recipe.load_recipe(args.recipe)
    if rec.distill is None:
        raise SystemExit(f"{args.recipe} has no [distill]")
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = replace(rec.distill, save_at=tuple(args.save_at), **overrides)
    teacher, student = models(rec)
    rep = distill.run(cfg, teacher, student, Path(args.out), progress=True)
    print(json.dumps({k: rep[k] for k in ("steps", "tokens_trained", "seconds", "stopped_by", "bf16")}))


def snapshots(run: Path) -> list[tuple[int, Path]]:
    """(tokens, folder) of the snapshots present, then the final student once written."""
    found = sorted((int(p.name[3:]), p) for p in run.glob("at-*") if (p / "model.safetensors").is_file())
    if (run / distill.REPORT).is_file():
        found.append((json.loads((run / distill.REPORT).read_text())["tokens_trained"], run))
    return found


def measure(args: argparse.Namespace) -> None:
    rec = recipe.load_recipe(args.recipe)
    ecfg = replace(rec.evaluate, threads=1)
    teacher_dir, student = models(rec)
    qa_file = resolve_text(ecfg.qa, "evaluate.qa")
    known, _, teacher_qa = teacher_known(teacher_rows(None, qa_file), qa_file, Path(args.run))
    questions = [qa.load(qa_file)[i] for i in known]
    t_logits, t_model = torch_logits(teacher_dir, 1)
    t0 = time.perf_counter()
    chats = teacher_chats(t_model, teacher_dir, ecfg.chat_tokens, ecfg.chat_max_answer, ecfg.chat_seed, "cpu")
    print(f"teacher chats: {len(chats)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows: list[dict[str, Any]] = []
    todo = [(0, student)] if args.undistilled else []
    while True:
        done = {r["folder"] for r in rows}
        todo += [s for s in snapshots(Path(args.run)) if str(s[1]) not in done and s not in todo]
        if not todo:
            if not args.watch or (Path(args.run) / distill.REPORT).is_file():
                break
            time.sleep(30)
            continue
        tokens, folder = todo.pop(0)
        rows.append(point(ecfg, tokens, folder, teacher_dir, t_logits, chats, questions, teacher_qa))
        write_results(Path(args.out), {"recipe": args.recipe, "run": args.run, "rows": rows}, table(rows))


SCORES = (
    "perplexity", "bits_per_byte", "teacher_bits_per_byte", "kl_to_teacher", "top1_agreement",
    "chat_kl_to_teacher", "chat_top1_agreement",
)  # fmt: skip


def point(
    ecfg: evaluate.EvaluateConfig,
    tokens: int,
    folder: Path,
    teacher_dir: Path,
    t_logits: Any,
    chats: list[tuple[list[int], int]],
    questions: list[qa.Question],
    teacher_qa: list[dict[str, Any]],
) -> dict[str, Any]:
    """One snapshot measured: text and chat scores against the teacher, QA retention."""
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    logits, model = torch_logits(folder, 1)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    scores, _ = evaluate.text_scores(
        ecfg, folder, encode, folder / "tokenizer.json", logits, t_logits, teacher_dir, chats, False, "curve"
    )
    answers = qa.answers_cached(lambda: model, folder, questions, ecfg.qa_max_tokens)
    summary = qa.summary(qa.scored(questions, answers), teacher_qa)
    row: dict[str, Any] = {"tokens": tokens, "folder": str(folder)}
    row |= {k: scores.get(k) for k in SCORES}
    row |= {k: summary.get(k) for k in ("qa_retained", "qa_retained_count", "qa_teacher_correct")}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Torch fp32 HF students (no ONNX, no INT8); QA: the questions the teacher answers correctly.",
        "",
        "| tokens | QA retained | chat top-1 | chat KL | text top-1 | text KL | perplexity | bits/byte |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:,} | {r['qa_retained_count']} = {100 * r['qa_retained']:.1f}% "
            f"| {100 * r['chat_top1_agreement']:.1f}% | {r['chat_kl_to_teacher']:.3f} "
            f"| {100 * r['top1_agreement']:.1f}% | {r['kl_to_teacher']:.3f} | {r['perplexity']:.2f} "
            f"| {r['bits_per_byte']:.3f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--recipe", required=True)
    t.add_argument("--out", required=True, help="the distill folder (a rerun into it resumes)")
    t.add_argument("--set", action="append", default=[], help="[distill] override: key=python literal")
    t.add_argument("--save-at", type=int, nargs="*", default=[], help="snapshot token counts")
    m = sub.add_parser("measure")
    m.add_argument("--recipe", required=True)
    m.add_argument("--run", required=True, help="a `train` folder")
    m.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_curve"))
    m.add_argument("--watch", action="store_true", help="wait for snapshots until the run's final model")
    m.add_argument("--undistilled", action="store_true", help="measure the pruned student first (0 tokens)")
    args = ap.parse_args()
    train(args) if args.cmd == "train" else measure(args)


if __name__ == "__main__":
    main()
