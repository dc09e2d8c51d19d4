"""Stage 8, report: the recipe's stage log and evaluations in, report.json + report.md + report.png out.

In: {"name", "stages": [per-stage facts from the recipe's StageLog], "evaluations": {stage:
evaluate result}, "quantization": the quantize report}. Out (in `out_dir`, copied into the bundle
by the recipe): `report.json` (everything, machine-readable), `report.md` (a table per stage and
the quantization's worst tensors) and `report.png` (size / perplexity / decode speed per
evaluated stage; needs matplotlib, skipped with a note if it is missing).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    chart: bool = True
    stage_evals: bool = True  # evaluate intermediate HF models (load/prune/distill) too
    # KL / top-1 against the teacher for intermediate stages too (doubles their cost: the
    # teacher runs again); the final bundle is always compared when evaluate.teacher is set.
    stage_teacher: bool = False
    worst_tensors: int = 5


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(data: dict[str, Any], config: ReportConfig) -> str:
    lines = [f"# Export report: {data['name']}", "", "## Stages", ""]
    lines += ["| stage | seconds | cached | facts |", "|---|---:|---|---|"]
    for s in data["stages"]:
        facts = {k: v for k, v in s.items() if k not in ("stage", "seconds", "cached")}
        text = ", ".join(f"{k}={_short(v)}" for k, v in facts.items())
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {'yes' if s['cached'] else 'no'} | {text} |")
    evals = data.get("evaluations") or {}
    if evals:
        first = next(iter(evals.values()))
        t = first.get("text", {})
        lines += [
            "",
            "## Quality, size, speed",
            "",
            f"Text: `{t.get('file')}` characters {t.get('chars')} (span {t.get('span')}), "
            f"{first.get('scored_tokens')} scored tokens, "
            f"context {t.get('context')}, stride {t.get('stride')}.",
            "",
            "| model after | parameters | size MiB | perplexity | KL to teacher | top-1 agree "
            "| chat KL | chat top-1 | decode tok/s | TTFT ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for stage, r in evals.items():
            ttft = r.get("ttft_s")
            who = "load: the teacher" if stage == "load" else stage  # the model all others are compared to
            lines.append(
                f"| {who} ({r.get('kind')}) | {r['parameters'] / 1e6:.2f}M | {r['size_bytes'] / 2**20:.1f} "
                f"| {r['perplexity']:.3f} | {_fmt(r.get('kl_to_teacher'), '.4f')} "
                f"| {_fmt(r.get('top1_agreement'), '.3f')} | {_fmt(r.get('chat_kl_to_teacher'), '.4f')} "
                f"| {_fmt(r.get('chat_top1_agreement'), '.3f')} | {_fmt(r.get('decode_tok_s'), '.1f')} "
                f"| {_fmt(None if ttft is None else 1000 * ttft, '.0f')} |"
            )
        trimmed = next((r for r in evals.values() if "vocab_trimmed" in r), None)
        if trimmed is not None:
            v = trimmed["vocab_trimmed"]
            lines += [
                "",
                f"Vocabulary trimmed to {v['vocab']} of the teacher's {v['teacher_vocab']} tokens: per-token "
                f"perplexities of the two tokenizers do not compare, bits per byte do: this model "
                f"{_fmt(trimmed.get('bits_per_byte'), '.4f')}, the teacher "
                f"{_fmt(trimmed.get('teacher_bits_per_byte'), '.4f')} (its own tokenization: perplexity "
                f"{trimmed['teacher_perplexity']:.3f} over {trimmed.get('teacher_scored_tokens')} tokens). "
                "KL and top-1 compare with the teacher restricted to the kept tokens, on this model's "
                "tokens.",
            ]
        chat = next((r for r in evals.values() if "chat_turns" in r), None)
        if chat is not None:
            lines += [
                "",
                f"Chat: {chat['chat_turns']} chat turns the teacher wrote (seed "
                f"{chat['config'].get('chat_seed')}), {chat['chat_scored_tokens']} answer tokens scored; "
                f"the teacher's perplexity on them {chat['teacher_chat_perplexity']:.3f}, this model's "
                f"{chat['chat_perplexity']:.3f}.",
            ]
        lines += ["", "Speed is measured on the export machine (best of the runs), not the board."]
        lines += qa_section(evals)
    quant = data.get("quantization") or {}
    errors = quant.get("errors") or {}
    if errors:
        worst = sorted(errors.items(), key=lambda kv: -kv[1]["rel_rms"])[: config.worst_tensors]
        m = quant.get("method", {})
        lines += ["", "## Quantization", "", f"Method: `{json.dumps(m)}`", ""]
        lines += ["| worst tensors | bits | rel RMS | max abs |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {e.get('bits')} | {e['rel_rms']:.5f} | {e['max_abs']:.5f} |" for n, e in worst]
        if "max_abs_weight" in m:  # ranked by relative error; the largest absolute one may differ
            lines += ["", f"Largest max-abs error: `{m['max_abs_weight']}` {m['max_abs']:.5f}."]
    return "\n".join(lines) + "\n"


def qa_section(evals: dict[str, dict[str, Any]]) -> list[str]:
    """The knowledge check (export/qa.py): per evaluated model, accuracy on the QA set and the
    fraction of the teacher's correct answers it keeps; then the last model's per category."""
    rows = {stage: r for stage, r in evals.items() if "qa_questions" in r}
    if not rows:
        return []
    first = next(iter(rows.values()))
    lines = [
        "",
        "## Knowledge (QA)",
        "",
        f"QA set `{first.get('qa_file')}`: {first['qa_questions']} questions, greedy chat answers of at "
        f"most {first['config'].get('qa_max_tokens')} tokens, scored on their first sentence (exact: "
        "verbatim; normalised: case, punctuation, articles, number words). Retained: of the questions "
        "the teacher answers correctly, the fraction this model answers correctly too.",
        "",
        "| model after | correct | correct exact | teacher correct | retained | retained exact "
        "| same answer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, r in rows.items():
        who = "load: the teacher" if stage == "load" else stage
        lines.append(
            f"| {who} | {r['qa_correct']}/{r['qa_questions']} | {r['qa_correct_exact']} "
            f"| {r.get('qa_teacher_correct', '—')} | {_pct(r.get('qa_retained'))} "
            f"| {_pct(r.get('qa_retained_exact'))} | {_pct(r.get('qa_same_answer'))} |"
        )
    stage, last = list(rows.items())[-1]
    cats = last.get("qa_by_category") or {}
    if cats:
        lines += ["", f"By category ({stage}):", ""]
        lines.append("| category | questions | correct | teacher correct | retained |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, c in cats.items():
            lines.append(
                f"| {name} | {c['questions']} | {c['correct']} | {c.get('teacher_correct', '—')} "
                f"| {c.get('retained', '—')} |"
            )
    return lines


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = json.dumps(v) if isinstance(v, dict | list) else str(v)
    return text if len(text) < 80 else text[:77] + "..."


def chart(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("report: matplotlib missing, no chart")
        return False
    evals = data.get("evaluations") or {}
    names = list(evals)
    panels = [
        ("size on disk (MiB)", [evals[n]["size_bytes"] / 2**20 for n in names]),
        ("parameters (M)", [evals[n]["parameters"] / 1e6 for n in names]),
        ("perplexity", [evals[n]["perplexity"] for n in names]),
        ("decode tok/s", [evals[n].get("decode_tok_s", 0.0) for n in names]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color="#4c72b0")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"{data['name']}: per stage (speed: bundle only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(config: ReportConfig, data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the report files; returns {name in bundle: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"report.json": out_dir / "report.json", "report.md": out_dir / "report.md"}
    files["report.json"].write_text(json.dumps(data, indent=1, default=str) + "\n")
    files["report.md"].write_text(markdown(data, config))
    if config.chart and data.get("evaluations") and chart(data, out_dir / "report.png"):
        files["report.png"] = out_dir / "report.png"
    return files
