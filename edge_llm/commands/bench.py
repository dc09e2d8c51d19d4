"""`edge-llm bench`: this runtime's speed and memory on a bundle; writes JSON, Markdown and a PNG.

The peers (llama.cpp, onnxruntime-genai, transformers) are not part of the runtime: the source
checkout's `benchmarks/bench.py --peers` passes its `peers.run_peer` to `run`, which measures
them on the same prompt token ids in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (system, prompt ids, settings) -> one result dict, as `benchmarks/peers.py`'s run_peer
PeerRunner = Callable[[str, dict[str, list[int]], dict[str, Any]], dict[str, Any]]
PEER_SYSTEMS = ("llamacpp", "ortgenai", "transformers")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode tok/s, TTFT, RSS and batch throughput")
    add_arguments(p)
    p.set_defaults(handler=run)


def add_arguments(p: argparse.ArgumentParser, outputs: bool = True) -> None:
    """The options shared by `edge-llm bench` and `benchmarks/bench.py` (which adds --peers and
    names the output files itself: `outputs=False`)."""
    from edge_llm.commands.generate import BUNDLE_HELP, add_provider_option_arg

    p.add_argument("--bundle", help=BUNDLE_HELP)
    p.add_argument("--runs", type=int, default=5, help="each figure is the median of this many runs")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--provider",
        default="cpu",
        help="execution provider(s), comma-separated: one row each, in the same run (e.g. cpu,openvino)",
    )
    add_provider_option_arg(p)
    p.add_argument("--batch-sizes", default="1,2,4,8", help="concurrent requests to measure, comma-separated")
    wikitext = os.environ.get("EDGE_LLM_WIKITEXT")
    p.add_argument(
        "--text",
        type=Path,
        default=Path(wikitext) if wikitext else None,
        help="text for the long prompt (default: $EDGE_LLM_WIKITEXT, else a repeated paragraph)",
    )
    p.add_argument("--long-tokens", type=int, default=500, help="length of the long prompt (TTFT)")
    p.add_argument(
        "--chats",
        type=int,
        default=1,
        choices=(1, 2, 3),
        help="time greedy decode on this many chat prompts (edge_llm/bench.py CHATS; 1: the short one)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every system this many times, round after round; the ratios are medians of the "
        "rounds' own ratios (later rounds skip the concurrent / batch runs)",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="K",
        help="also measure with prompt-lookup speculation of K tokens (greedy output unchanged)",
    )
    if outputs:
        p.add_argument("--json", type=Path, help="write results as JSON")
        p.add_argument("--markdown", type=Path, help="write the table as Markdown")
        p.add_argument("--png", type=Path, help="write a chart (needs matplotlib)")


def _isolated(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a fresh interpreter, so peak RSS (VmHWM) is that run's alone: in one
    process the prompt-lookup variant reported the 8-row batch cache of the run before it
    (1224 MiB), since freed heap pages need not go back to the OS. The peers run in workers too."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def run(args: argparse.Namespace, peers: PeerRunner | None = None) -> int:
    from edge_llm import bench
    from edge_llm.bandwidth import read_bandwidth
    from edge_llm.engine import Engine
    from edge_llm.errors import ConfigError
    from edge_llm.paths import resolve_bundle

    if args.rounds < 1 or args.runs < 1:
        raise ConfigError(f"bench: --rounds and --runs must be >= 1 (got {args.rounds}, {args.runs})")
    bundle = str(resolve_bundle(args.bundle))
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    tokenizer = Engine.load(bundle, verify=False).tokenizer  # the engine itself is not kept
    ids = bench.prompts_from(tokenizer, args.long_tokens, args.text, chats=args.chats)
    common = {"runs": args.runs, "new_tokens": args.new_tokens, "threads": args.threads}
    from edge_llm.commands.generate import provider_specs
    from edge_llm.providers import overlay, parse_option_overrides

    specs = provider_specs(args.provider)
    if args.provider_option:
        specs = overlay(specs, parse_option_overrides(args.provider_option))
    peer_systems = tuple(getattr(args, "peer_systems", None) or PEER_SYSTEMS)

    def jobs_of(first: bool) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
        """Every system once; rounds after the first skip the concurrent / batch runs (the
        8-vs-1 speedup is already paired inside the first round's edge-llm job)."""
        ours = {**common, "batch_sizes": sizes if first else []}
        jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (
                "edge-llm" if len(specs) == 1 else f"edge-llm ({spec.name})",
                lambda spec=spec: _isolated(
                    bench.measure, bundle, ids, provider=spec.name, provider_options=spec.options, **ours
                ),
            )
            for spec in specs  # one row per provider, in the same run
        ]
        if args.prompt_lookup:
            lookup = {**common, "batch_sizes": [1], "prompt_lookup": args.prompt_lookup}
            name = f"edge-llm+lookup{args.prompt_lookup}"
            jobs.append((name, lambda: _isolated(bench.measure, bundle, ids, **lookup)))
        if peers is not None:
            settings = {**common, "batch_size": 4 if first else 0}
            jobs += [(s, lambda s=s: peers(s, ids, settings)) for s in peer_systems]
        return jobs

    n_jobs = len(jobs_of(True))
    # Each system takes from seconds to minutes: one line as it starts and one as it ends, so a
    # silent terminal never has to be guessed at.
    print(
        f"edge-llm bench: {n_jobs} system(s) x {args.rounds} round(s), prompts {len(ids['short'])} / "
        f"{len(ids['long'])} tokens, {len(bench.chat_keys(ids))} chat(s), {args.new_tokens} new, "
        f"{args.runs} runs, {args.threads} threads",
        file=sys.stderr,
        flush=True,
    )
    # The machine's read bandwidth before and after the systems run (a shared host drifts): the
    # limit is the better of the two, and both are in the JSON.
    before = read_bandwidth(args.threads)
    rounds: list[list[dict[str, Any]]] = []
    for r in range(args.rounds):
        tag = f"round {r + 1}/{args.rounds} " if args.rounds > 1 else ""
        jobs = jobs_of(r == 0)
        rounds.append([_timed(i, len(jobs), tag + name, job) for i, (name, job) in enumerate(jobs, 1)])
    after = read_bandwidth(args.threads)
    results = rounds[0]
    limit = add_limit(results, [before, after])
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
        "results": results,
        "ratios": ratios(results),
        "ratios_over_rounds": ratios_over_rounds(rounds),
        "rounds": [[_brief(x) for x in rnd] for rnd in rounds],
        "outputs": outputs(results, tokenizer),
        "read_bandwidth": limit,
    }
    table = markdown(results, limit) + extra_markdown(report)
    if len(rounds) > 1:  # the table and its read-limit fractions are one round's, not medians
        table = (
            f"Round 1 of {len(rounds)} (the round with the concurrent runs); the decode ratios per"
            " prompt further down are medians over all rounds.\n\n" + table
        )
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.png:
        chart(results, args.png)
    return 0


def _timed(i: int, n: int, name: str, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"edge-llm bench: [{i}/{n}] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = job()
    took = f"{time.perf_counter() - t0:.0f} s"
    outcome = (
        f"skipped ({str(result['skipped'])[:100]})"
        if result.get("skipped")
        else f"decode {result['decode_tok_s']:.1f} tok/s"
    )
    print(f"edge-llm bench: [{i}/{n}] {name} done in {took}: {outcome}", file=sys.stderr, flush=True)
    return result


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each of our variants over each peer, measured in this run (>1 = ours is faster / bigger);
    `decode_by_prompt`: the same for every timed chat prompt both measured."""
    ours = [r for r in results if r["system"].startswith("edge-llm") and not r.get("skipped")]
    peers = [r for r in results if not r["system"].startswith("edge-llm") and not r.get("skipped")]
    return {
        f"{o['system']} / {p['system']}": {
            "decode": o["decode_tok_s"] / p["decode_tok_s"],
            "decode_by_prompt": _by_prompt(o, p),
            "ttft_short": o["ttft_short_ms"] / p["ttft_short_ms"],
            "ttft_long": o["ttft_long_ms"] / p["ttft_long_ms"],
            "peak_rss": o["peak_rss_mib"] / p["peak_rss_mib"],
        }
        for o in ours
        for p in peers
    }


def _by_prompt(o: dict[str, Any], p: dict[str, Any]) -> dict[str, float]:
    mine, theirs = o.get("decode_tok_s_by_prompt", {}), p.get("decode_tok_s_by_prompt", {})
    return {k: mine[k] / theirs[k] for k in mine if k in theirs}


def ratios_over_rounds(rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per pair and chat prompt: each round's decode ratio (both systems measured minutes apart
    in that round), their median and range: the spread a shared host gives one comparison."""
    per: dict[str, dict[str, list[float]]] = {}
    for results in rounds:
        for pair, r in ratios(results).items():
            for prompt, value in r["decode_by_prompt"].items():
                per.setdefault(pair, {}).setdefault(prompt, []).append(value)
    return {
        pair: {
            prompt: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
            for prompt, v in by.items()
        }
        for pair, by in per.items()
    }


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    """One round's figures of one system, for the JSON's `rounds`."""
    keys = ("system", "skipped", "decode_tok_s", "decode_tok_s_by_prompt", "ttft_short_ms", "ttft_long_ms")
    return {k: r.get(k) for k in (*keys, "loadavg_1min_start", "cpu_util")}


def outputs(results: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """Every system's greedy answer to each chat prompt as text (one tokenizer for all: every
    system got and returned ids of the bundle's vocabulary), the number of new tokens, and how
    many leading tokens it shares with our first row's answer: a sanity check that all systems
    ran the same model on the same prompt (int8 near-ties may part them later)."""
    ok = [r for r in results if not r.get("skipped") and r.get("output_ids_by_prompt")]
    if not ok:
        return {}
    ref = ok[0]["output_ids_by_prompt"]
    out: dict[str, Any] = {}
    for r in ok:
        for prompt, ids in r["output_ids_by_prompt"].items():
            mine = ref.get(prompt, [])
            same = next(
                (i for i, (a, b) in enumerate(zip(ids, mine, strict=False)) if a != b),
                min(len(ids), len(mine)),
            )
            out.setdefault(r["system"], {})[prompt] = {
                "new_tokens": len(ids),
                "same_prefix_as_first_row": same,
                "text": tokenizer.decode(ids),
            }
    return out


def add_limit(results: list[dict[str, Any]], measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Each result's batch-1 decode as weight traffic (GB/s) and as a fraction of the machine's
    read bandwidth (the best of `measured`), in place; returns the limit record for the JSON.

    Each system is charged the bytes its own model file streams per step (`benchmarks/peers_worker.py`
    counts the GGUF's tensors, ort-genai's ONNX graph, torch's Linear weights); a result that
    brings none is charged the bundle's bytes (`weight_bytes_from` says which)."""
    from edge_llm.bandwidth import decode_traffic

    best = max(measured, key=lambda m: m["gb_s"])
    limit = {**best, "passes": measured}
    ours = next((r.get("weight_bytes_per_token") for r in results if r.get("weight_bytes_per_token")), None)
    for r in results:
        if r.get("skipped") or not ours:
            continue
        if not r.get("weight_bytes_per_token"):
            r["weight_bytes_per_token"], r["weight_bytes_from"] = ours, "edge-llm bundle"
        r.setdefault("weight_bytes_from", "own model file")
        r.update(decode_traffic(r["decode_tok_s"], r["weight_bytes_per_token"], limit["gb_s"]))
    return limit


def markdown(results: list[dict[str, Any]], limit: dict[str, Any] | None = None) -> str:
    ours = results[0]
    sizes = list(ours.get("batch_tok_s_by_size", {}))
    head = [
        "system",
        "decode tok/s",
        "TTFT short ms",
        "TTFT long ms",
        "peak RSS MiB",
        *(["weight GB/s (of limit)"] if limit else []),
        *[f"{b} conc. tok/s" for b in sizes],
        "peer batch tok/s",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    llama = next((r for r in results if r.get("system") == "llamacpp" and not r.get("skipped")), None)
    for r in results:
        if r.get("skipped"):
            rows.append(f"| {r['system']} | skipped: {str(r['skipped'])[:90]} |" + " |" * (len(head) - 2))
            continue
        pt = r.get("prompt_tokens", {})
        decode = f"{r['decode_tok_s']:.1f}"
        if llama is not None and r is not llama:
            decode += f" ({r['decode_tok_s'] / llama['decode_tok_s']:.2f}× llama.cpp)"
        by_size = r.get("batch_tok_s_by_size", {})
        batch = [f"{by_size[b]:.1f}" if b in by_size else "" for b in sizes]
        peer_batch = (
            ""
            if r["system"].startswith("edge-llm")
            else (f"{r['batch_tok_s']:.1f} (B={r['batch_size']})" if r.get("batch_tok_s") else "n/a")
        )
        rows.append(
            f"| {r.get('label', r['system'])} | {decode} | {r['ttft_short_ms']:.1f} (@{pt.get('short')}) | "
            f"{r['ttft_long_ms']:.1f} (@{pt.get('long')}) | {r['peak_rss_mib']:.0f} | "
            + (f"{_traffic(r)} | " if limit else "")
            + " | ".join(batch)
            + f" | {peer_batch} |"
        )
    if limit:
        rows.append(
            f"\nMachine limit: {limit['gb_s']:.1f} GB/s streaming read ({limit['threads']} threads, "
            f"{limit['buffer_mib']} MiB buffer; median pass {limit['gb_s_median']:.1f} GB/s). Weight GB/s = "
            "batch-1 decode tok/s × the matmul weight + scale bytes one step reads (each system's own "
            "model file where it reports them, else the bundle's); a fraction "
            "above 1 can mean part of the weights stayed in cache, or a busier host when the limit was read."
        )
    return "\n".join(rows)


def extra_markdown(report: dict[str, Any]) -> str:
    """The per-prompt decode table, the ratios over rounds and the answers' sanity check."""
    ok = [r for r in report["results"] if not r.get("skipped")]
    prompts = list(ok[0].get("decode_tok_s_by_prompt", {})) if ok else []
    parts = []
    if len(prompts) > 1:
        rows = [
            "| system | " + " | ".join(f"{p} tok/s" for p in prompts) + " | weight bytes/token | from |",
            "|---|" + "---:|" * len(prompts) + "---:|---|",
        ]
        for r in ok:
            by = r.get("decode_tok_s_by_prompt", {})
            cells = " | ".join(f"{by[p]:.1f}" if p in by else "" for p in prompts)
            wb = r.get("weight_bytes_per_token")
            rows.append(
                f"| {r.get('label', r['system'])} | {cells} | "
                f"{wb / 1e6:.1f} MB | {r.get('weight_bytes_from', '')} |"
                if wb
                else f"| {r.get('label', r['system'])} | {cells} | | |"
            )
        parts.append("\n\nBatch-1 greedy decode per chat prompt (round 1):\n\n" + "\n".join(rows))
    over = report.get("ratios_over_rounds", {})
    if over:
        n = len(report.get("rounds", []))
        rows = ["| ours / peer | " + " | ".join(prompts) + " |", "|---|" + "---:|" * len(prompts)]
        for pair, by in over.items():
            cells = [
                f"{by[p]['median']:.2f} ({by[p]['min']:.2f}–{by[p]['max']:.2f})" if p in by else ""
                for p in prompts
            ]
            rows.append(f"| {pair} | " + " | ".join(cells) + " |")
        parts.append(
            f"\n\nDecode ratio per chat prompt, median of {n} round(s) (range):\n\n" + "\n".join(rows)
        )
    answers = report.get("outputs", {})
    if answers:
        rows = [
            "| system | prompt | new tokens | same first tokens as row 1 | answer starts |",
            "|---|---|---:|---:|---|",
        ]
        for system, by in answers.items():
            for prompt, a in by.items():
                text = a["text"][:70].replace("\n", " ").replace("|", "/")
                rows.append(
                    f"| {system} | {prompt} | {a['new_tokens']} | {a['same_prefix_as_first_row']} | {text} |"
                )
        parts.append("\n\nGreedy answers (last timed run):\n\n" + "\n".join(rows))
    return "".join(parts)


def _traffic(r: dict[str, Any]) -> str:
    if "weight_gb_s" not in r:
        return ""
    return f"{r['weight_gb_s']:.1f} ({r['fraction_of_limit']:.2f}×)"


def chart(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("edge-llm bench: matplotlib not installed; no chart", file=sys.stderr)
        return
    ok = [r for r in results if not r.get("skipped")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r.get("label", r["system"]) for r in ok]
    axes[0].barh(names, [r["decode_tok_s"] for r in ok])
    axes[0].set_title("decode tok/s (batch 1)")
    axes[1].barh(names, [r["ttft_long_ms"] for r in ok])
    axes[1].set_title(f"TTFT ms @ {ok[0]['prompt_tokens']['long']} tokens")
    sizes = ok[0].get("batch_tok_s_by_size", {})
    axes[2].plot([int(b) for b in sizes], list(sizes.values()), marker="o")
    axes[2].set_title("edge-llm aggregate tok/s vs concurrent requests")
    axes[2].set_xlabel("concurrent requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
