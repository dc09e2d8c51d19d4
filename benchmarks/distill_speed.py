"""Distillation training tokens/s: the live teacher in fp32 (as before) against cached top-k teacher
targets and bf16 autocast, interleaved in one process on the recipe's pruned student.

    python benchmarks/distill_speed.py --recipe configs/recipes/smollm2-pruned-int8.toml --rounds 3

Each mode is a short `distill.run` of the recipe's [distill] (text rows only: no chats, which
change what is trained on, not the cost per token) from the same pruned student; tokens/s is
the run's own training time (report `seconds`: model loading and saving excluded). Modes, in
this order every round: `before` (teacher every micro-batch, fp32), `cached-cold` (the first
epoch: the teacher runs and its top-k is kept; its cache file is removed first), `cached` (the
same rows again: no teacher), `bf16` (live teacher, student decoder in bf16 autocast),
`cached+bf16`. Also, once: how far the top-k + tail loss's gradient (on the student's logits) is
from the full KL's on held-out text, per k (cosine, norm ratio, the teacher's tail mass).
Writes OUT.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.distill_curve import models  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402
from export import distill, distill_targets, qa, recipe, trim_vocab  # noqa: E402

MODES = {
    "before": {"teacher_topk": 0, "autocast": "off"},
    "cached-cold": {"autocast": "off"},
    "cached": {"autocast": "off"},
    "bf16": {"teacher_topk": 0, "autocast": "bf16"},
    "cached+bf16": {"autocast": "bf16"},
}


def fidelity(cfg: distill.DistillConfig, teacher: Path, student: Path, ks: list[int]) -> list[dict[str, Any]]:
    """Top-k + tail against the full KL on two held-out rows: the gradient on the student's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    vmap = trim_vocab.teacher_ids(student)
    tok = distill.load_tokenizer(student)
    ids = distill.held_out_ids(replace(cfg, eval_every=1), tok)
    rows = torch.from_numpy(ids[: 2 * cfg.seq_len].reshape(2, cfg.seq_len))
    t_model = AutoModelForCausalLM.from_pretrained(str(teacher))
    if vmap is not None:
        trim_vocab.restrict_head(t_model, vmap)
    with torch.no_grad():
        t = t_model(rows if vmap is None else torch.from_numpy(vmap)[rows]).logits
        s = AutoModelForCausalLM.from_pretrained(str(student))(rows).logits
    T = cfg.temperature

    def grad(loss: Any) -> Any:
        x = s.clone().requires_grad_(True)
        loss(x).backward()
        return x.grad.flatten()

    def full_kl(x: Any) -> Any:
        t_lp = torch.log_softmax(t / T, -1)
        return (t_lp.exp() * (t_lp - torch.log_softmax(x / T, -1))).sum(-1).mean()

    full = grad(full_kl)
    out = []
    for k in ks:
        target = distill_targets.teacher_topk(t, k, T)
        g = grad(lambda x, target=target: distill_targets.topk_kl(x, *target, T))
        out.append({
            "k": k,
            "grad_cosine": float(torch.cosine_similarity(g, full, dim=0)),
            "grad_norm_ratio": float(g.norm() / full.norm()),
            "teacher_tail_mass": float(target[2].exp().mean()),
            "loss_ratio": float(distill_targets.topk_kl(s, *target, T) / full_kl(s)),
        })  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "recipes" / "smollm2-pruned-int8.toml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per mode and round")
    ap.add_argument("--k", type=int, default=128, help="teacher_topk of the cached modes")
    ap.add_argument("--fidelity-k", type=int, nargs="*", default=[32, 64, 128, 256])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_speed"))
    args = ap.parse_args()
    rec = recipe.load_recipe(args.recipe)
    if rec.distill is None:
        ap.error(f"{args.recipe} has no [distill]")
    teacher, student = models(rec)
    per_step = rec.distill.seq_len * rec.distill.batch * rec.distill.grad_accum
    base = replace(
        rec.distill, chat_tokens=0, questions=None, exclude_qa=None, tokens=args.steps * per_step,
        eval_every=0, max_minutes=0.0, save_at=(), teacher_topk=args.k, threads=1,
    )  # fmt: skip
    data = distill.training_ids(base, distill.load_tokenizer(student), None, "cpu")[0]
    vmap = trim_vocab.teacher_ids(student)
    cache_file = distill_targets.targets_path(qa.model_digest(teacher), data, args.k, base.temperature, vmap)
    load = [os.getloadavg()[0]]
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for r in range(args.rounds):
            for mode, over in MODES.items():
                if mode == "cached-cold":
                    cache_file.unlink(missing_ok=True)
                rep = distill.run(
                    replace(base, **over), teacher, student, Path(tmp) / f"{mode}-{r}", progress=False
                )
                if mode.startswith("cached"):
                    assert rep["teacher_rows"] == (0 if mode != "cached-cold" else per_step // base.seq_len)
                runs[mode].append(rep["tokens_trained"] / rep["seconds"])
                load.append(os.getloadavg()[0])
                print(f"round {r + 1} {mode}: {runs[mode][-1]:.1f} tok/s (load {load[-1]:.1f})", flush=True)
    med = {m: statistics.median(v) for m, v in runs.items()}
    ratio = {
        m: statistics.median(a / b for a, b in zip(v, runs["before"], strict=True)) for m, v in runs.items()
    }
    fid = fidelity(base, teacher, student, args.fidelity_k)
    doc = {
        "recipe": args.recipe, "rounds": args.rounds, "steps": args.steps, "tokens_per_step": per_step,
        "k": args.k, "load_1min": load, "tok_s": runs, "median_tok_s": med, "ratio_to_before": ratio,
        "fidelity": fid, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    lines = [
        f"Training tok/s on {Path(args.recipe).name}'s pruned student, one torch thread, "
        f"{args.steps} step(s) of {per_step} tokens per mode and round, {args.rounds} interleaved rounds; "
        f"1-min load {min(load):.1f}-{max(load):.1f}; {doc['when']}.",
        "",
        "| mode | tok/s per round | median | × before (median of per-round ratios) |",
        "|---|---|---:|---:|",
    ]
    for m, v in runs.items():
        lines.append(f"| {m} | {', '.join(f'{x:.1f}' for x in v)} | {med[m]:.1f} | {ratio[m]:.2f} |")
    lines += [
        "",
        f"Top-k + tail vs full KL (T = {base.temperature}), gradient on the student's logits, "
        "2 held-out rows:",
        "",
        "| k | gradient cosine | gradient norm ratio | teacher tail mass | loss ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for f in fid:
        lines.append(
            f"| {f['k']} | {f['grad_cosine']:.4f} | {f['grad_norm_ratio']:.3f} "
            f"| {f['teacher_tail_mass']:.3f} | {f['loss_ratio']:.3f} |"
        )
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
