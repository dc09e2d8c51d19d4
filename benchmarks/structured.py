"""Structured output on a real bundle: how often the answer is JSON, and schema-valid JSON, with
and without constrained decoding, and what the mask costs per token.

In: a bundle (default: the default bundle) and `benchmarks/data/structured_prompts.jsonl` (50
prompts of our own: 25 "extract name and age from: ..." and 25 smart-home commands such as "set
the kitchen light to 30%", each with the answer we expect). Every prompt runs greedy three
ways, with the same chat messages (a system prompt that asks for JSON and shows its keys):

- `free`: no response_format (the model's own JSON, or not);
- `json_object`: any JSON object, enforced;
- `json_schema`: the task's schema, enforced (llguidance, extra `structured`).

An answer counts as valid JSON when `json.loads` takes the whole text, and schema-valid when
`jsonschema` accepts it against the task's schema; "fields right" compares with the expected
values. Decode speed is each request's `usage.decode_tok_s` (tokens after the first / time after
the first), median over the prompts: the mask's cost is the difference between the modes.

Out: printed, and `benchmarks/results/structured.{json,md}` (`--out` to change).

    python benchmarks/structured.py [--bundle DIR] [--max-tokens 96] [--limit N]

On a 2-core machine shared with other jobs the speed figures carry that machine's noise;
the rates do not (greedy decoding is deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.engine import Engine  # noqa: E402
from edge_llm.paths import resolve_bundle  # noqa: E402
from edge_llm.sampling import SamplingParams  # noqa: E402
from edge_llm.structured import parse_response_format  # noqa: E402

SCHEMAS: dict[str, dict[str, Any]] = {
    "extract": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "device": {
        "type": "object",
        "properties": {
            "device": {"type": "string"},
            "action": {"type": "string", "enum": ["on", "off", "set"]},
            "value": {"type": ["integer", "null"]},
        },
        "required": ["device", "action", "value"],
        "additionalProperties": False,
    },
}
SYSTEM = {
    "extract": 'Extract the person\'s name and age. Answer with JSON only: {"name": string, "age": integer}.',
    "device": (
        "You control a smart home. Turn the command into JSON only: "
        '{"device": string, "action": "on" | "off" | "set", "value": integer or null}.'
    ),
}
USER = {"extract": "Extract name and age from: {text}", "device": "{text}"}
MODES = ("free", "json_object", "json_schema")


def load_prompts(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def judge(text: str, kind: str, expected: dict[str, Any]) -> dict[str, bool]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"valid_json": False, "schema_valid": False, "fields_right": False}
    try:
        jsonschema.validate(value, SCHEMAS[kind])
        schema_ok = True
    except jsonschema.ValidationError:
        schema_ok = False
    right = isinstance(value, dict) and all(
        str(value.get(k)).strip().lower() == str(v).strip().lower() for k, v in expected.items()
    )
    return {"valid_json": True, "schema_valid": schema_ok, "fields_right": right}


def run(engine: Engine, prompts: list[dict[str, Any]], mode: str, max_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for p in prompts:
        kind = p["kind"]
        messages = [
            {"role": "system", "content": SYSTEM[kind]},
            {"role": "user", "content": USER[kind].format(text=p["text"])},
        ]
        fmt = None
        if mode == "json_object":
            fmt = parse_response_format({"type": "json_object"})
        elif mode == "json_schema":
            spec = {"name": kind, "schema": SCHEMAS[kind], "strict": True}
            fmt = parse_response_format({"type": "json_schema", "json_schema": spec})
        ids = engine.encode_request(messages=messages)
        final = engine.complete(ids, SamplingParams(max_tokens=max_tokens), response_format=fmt)
        usage = final.usage.as_dict() if final.usage else {}
        rows.append(
            {
                "kind": kind,
                "text": final.text,
                "finish_reason": final.finish_reason,
                "completion_tokens": usage.get("completion_tokens"),
                "decode_tok_s": usage.get("decode_tok_s"),
                **judge(final.text, kind, p["expected"]),
            }
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    speeds = [r["decode_tok_s"] for r in rows if r["completion_tokens"] and r["completion_tokens"] > 1]
    return {
        "prompts": n,
        "valid_json_pct": round(100 * sum(r["valid_json"] for r in rows) / n, 1),
        "schema_valid_pct": round(100 * sum(r["schema_valid"] for r in rows) / n, 1),
        "fields_right_pct": round(100 * sum(r["fields_right"] for r in rows) / n, 1),
        "finished_stop": sum(r["finish_reason"] == "stop" for r in rows),
        "mean_completion_tokens": round(statistics.mean(r["completion_tokens"] or 0 for r in rows), 1),
        "median_decode_tok_s": round(statistics.median(speeds), 1) if speeds else None,
    }


def mask_cost(engine: Engine, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mask's own cost: each schema-mode answer's tokens replayed through a fresh matcher,
    timing `allowed()` + `consume()` per token (no model in the loop, so less noisy than the
    difference of two decode speeds)."""
    times: list[float] = []
    for r in rows:
        spec = {"name": r["kind"], "schema": SCHEMAS[r["kind"]]}
        constraint = engine.constraint(parse_response_format({"type": "json_schema", "json_schema": spec}))
        assert constraint is not None
        for token in engine.tokenizer.encode(r["text"]):
            t0 = time.perf_counter()
            if not constraint.allowed()[token]:
                break  # re-encoding may split the text differently from what was generated
            constraint.consume(token)
            times.append(time.perf_counter() - t0)
    return {
        "tokens": len(times),
        "median_ms": round(1000 * statistics.median(times), 3),
        "mean_ms": round(1000 * statistics.mean(times), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the default bundle)")
    ap.add_argument("--prompts", type=Path, default=ROOT / "benchmarks/data/structured_prompts.jsonl")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts of each kind")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/structured")
    ap.add_argument(
        "--mask-only", action="store_true", help="only add the mask's cost to an existing OUT.json"
    )
    args = ap.parse_args(argv)
    if args.mask_only:
        doc = json.loads(args.out.with_suffix(".json").read_text())
        engine = Engine.load(doc["bundle"])
        doc["mask_cost"] = mask_cost(engine, doc["answers"]["json_schema"])
        md = args.out.with_suffix(".md").read_text().rstrip("\n").split("\n")
        write_results(args.out, doc, [*md, "", mask_line(doc["mask_cost"])])
        print(mask_line(doc["mask_cost"]))
        return 0
    bundle = resolve_bundle(args.bundle)
    prompts = load_prompts(args.prompts)
    if args.limit:
        prompts = [p for k in SCHEMAS for p in [q for q in prompts if q["kind"] == k][: args.limit]]
    engine = Engine.load(bundle)
    t0 = time.perf_counter()
    engine.constraint(parse_response_format({"type": "json_object"}))  # llguidance's tokenizer, once
    setup_s = time.perf_counter() - t0
    engine.complete(engine.encode_request(prompt="Hello"), SamplingParams(max_tokens=4))  # warm-up
    results: dict[str, Any] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for mode in MODES:
        rows = run(engine, prompts, mode, args.max_tokens)
        samples[mode] = rows
        results[mode] = {k: summary([r for r in rows if r["kind"] == k]) for k in SCHEMAS}
        results[mode]["all"] = summary(rows)
        print(mode, json.dumps(results[mode]["all"]), flush=True)
    cost = mask_cost(engine, samples["json_schema"])
    doc = {
        "bundle": str(Path(bundle).resolve()),
        "mask_cost": cost,
        "max_tokens": args.max_tokens,
        "greedy": True,
        "llguidance_tokenizer_setup_s": round(setup_s, 3),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "results": results,
        "answers": samples,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    md = [
        f"# Structured output ({doc['date']}, {Path(bundle).resolve().name}, greedy, max_tokens "
        f"{args.max_tokens}, {len(prompts)} prompts)",
        "",
        "| mode | task | valid JSON % | schema-valid % | fields right % | finished (stop) | mean tokens |"
        " median decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        for task in (*SCHEMAS, "all"):
            s = results[mode][task]
            cells = [mode, task, s["valid_json_pct"], s["schema_valid_pct"], s["fields_right_pct"]]
            cells += [f"{s['finished_stop']}/{s['prompts']}", s["mean_completion_tokens"]]
            cells.append(s["median_decode_tok_s"])
            md.append("| " + " | ".join(str(c) for c in cells) + " |")
    md += [
        "",
        f"llguidance tokenizer setup (once per server, on the first JSON request): {setup_s:.2f} s. "
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
        "(shared machine: speed figures are noisy).",
    ]
    md += ["", mask_line(cost)]
    write_results(args.out, doc, md)
    print("\n".join(md))
    return 0


def mask_line(cost: dict[str, Any]) -> str:
    return (
        "Mask cost alone (llguidance `allowed()` + `consume()`, the schema answers replayed, "
        f"{cost['tokens']} tokens): median {cost['median_ms']} ms, mean {cost['mean_ms']} ms per token."
    )


if __name__ == "__main__":
    raise SystemExit(main())
