"""`edge-llm generate` (one prompt, streamed) and `edge-llm chat` (interactive, multi-turn)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from edge_llm.board import load_board
from edge_llm.engine import Engine, Slot
from edge_llm.providers import ProviderSpec, ort_options
from edge_llm.sampling import SamplingParams


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="stream the answer to one prompt")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.add_argument("prompt", help="the prompt (sent as a user message unless --raw)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--stats", action="store_true", help="print usage as one JSON line on stderr")
    gen.set_defaults(handler=run_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (empty line or Ctrl-D ends)")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.add_argument("--system", help="system message")
    chat.set_defaults(handler=run_chat)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder written by `edge-llm export`")
    p.add_argument("--config", help="board profile TOML (configs/boards/NAME.toml)")
    p.add_argument("--threads", type=int, help="intra-op threads (overrides the board profile)")
    p.add_argument(
        "--provider",
        metavar="NAME",
        help="execution provider (cpu, cuda, openvino, qnn, ...): overrides the board profile's list",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of bundle files")
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        help="speculate up to K tokens copied from the context (greedy only; 0 = off)",
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")


def load_engine(args: argparse.Namespace) -> Engine:
    options = load_board(args.config).runner_options()
    if args.threads is not None:
        options = replace(options, threads=args.threads)
    if args.prompt_lookup is not None:
        options = replace(options, prompt_lookup=args.prompt_lookup)
    if args.provider:
        options = replace(options, providers=provider_specs(args.provider))
    return Engine.load(args.bundle, options, verify=not args.no_verify)


def provider_specs(names: str) -> tuple[ProviderSpec, ...]:
    """`--provider openvino` (or "qnn,cpu"): specs with default options, unknown names refused."""
    specs = tuple(ProviderSpec(n.strip().lower()) for n in names.split(",") if n.strip())
    for spec in specs:
        ort_options(spec)  # ConfigError naming the known providers
    return specs


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def messages_for(prompt: str, system: str | None) -> list[dict[str, Any]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}]


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    engine = load_engine(args)
    if args.raw:
        ids = engine.encode_request(prompt=args.prompt)
    else:
        ids = engine.encode_request(messages=messages_for(args.prompt, args.system))
    final = stream_to(engine, ids, params, Slot())
    if args.stats:
        stats = {"finish_reason": final.finish_reason, **final.usage.as_dict()}
        print(json.dumps(stats), file=sys.stderr)
    return 0


def stream_to(engine: Engine, ids: list[int], params: SamplingParams, slot: Slot) -> Any:
    final = None
    for chunk in engine.generate(ids, params, slot):
        if chunk.done:
            final = chunk
        else:
            sys.stdout.write(chunk.delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return final


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    engine = load_engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    slot = Slot()  # one KV slot for the whole conversation: each turn prefills only what is new
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        ids = engine.encode_request(messages=history)
        final = stream_to(engine, ids, params, slot)
        history.append({"role": "assistant", "content": final.text})
    return 0
