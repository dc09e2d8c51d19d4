"""`edge-llm generate` (one prompt, streamed) and `edge-llm chat` (interactive, multi-turn)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from typing import Any

from edge_llm.board import BoardConfig, load_board
from edge_llm.bundle import load_bundle
from edge_llm.engine import Engine, Slot
from edge_llm.errors import ConfigError, RequestError
from edge_llm.memory import plan_memory
from edge_llm.paths import resolve_bundle
from edge_llm.providers import ProviderSpec, ort_options, overlay, parse_option_overrides
from edge_llm.sampling import SamplingParams

BUNDLE_HELP = (
    "bundle folder written by `edge-llm export` (default: the default bundle, "
    "$EDGE_LLM_CACHE/bundles/default, which `edge-llm export` without --out links)"
)


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
    p.add_argument("--bundle", help=BUNDLE_HELP)
    p.add_argument("--config", help="board profile TOML (configs/boards/NAME.toml)")
    p.add_argument("--threads", type=int, help="intra-op threads (overrides the board profile)")
    p.add_argument(
        "--provider",
        metavar="NAME",
        help="execution provider (cpu, cuda, openvino, qnn, ...): overrides the board profile's list",
    )
    add_provider_option_arg(p)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of bundle files")
    p.add_argument(
        "--memory-mb",
        type=int,
        metavar="MB",
        help="memory budget (MiB): rows, context and live sessions are sized to fit "
        "(overrides [runtime] memory_mb; 0 = none)",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        help="speculate up to K tokens copied from the context (greedy only; 0 = off)",
    )
    p.add_argument(
        "--speculation",
        choices=("auto", "off", "draft", "lookup"),
        help="speculative decoding: the bundle's trained draft, prompt lookup, or off (plain "
        "decoding, for comparison); default: the board profile's [runtime] speculation (auto: the "
        "draft when the bundle has one)",
    )
    p.add_argument("--draft-tokens", type=int, metavar="K", help="draft tokens one verify checks at most")
    p.add_argument(
        "--pad-decode",
        action="store_true",
        default=None,
        help="run 1-token steps as 2-token forwards ([runtime] pad_decode): greedy speculation on an "
        "int8 graph then gives plain decoding's output bit for bit",
    )


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = 256) -> None:
    """`max_tokens` None: the flag is left out of the request unless given (`send`: the server
    then gives as many tokens as fit, up to its default)."""
    more = " (default: as many as fit, up to the server's default)" if max_tokens is None else ""
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most{more}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        type=unescape,
        help=r'stop string (repeatable); C escapes \n \t \r \\ \" \xHH \uXXXX are decoded: --stop "\n\n"',
    )
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")


def load_engine(
    args: argparse.Namespace, board: BoardConfig | None = None, single_stream: bool = False
) -> tuple[Engine, BoardConfig]:
    """The engine for `--bundle`, and the board profile as planned: with a memory budget
    (`--memory-mb` or `[runtime] memory_mb`) its rows, context and live sessions are the plan's,
    and a budget the bundle cannot fit is refused before the graph is loaded. `single_stream`
    (generate, chat: one conversation): one KV row, and so the portable graph (runner.py)."""
    board = board if board is not None else load_board(args.config)
    runtime = board.runtime
    if single_stream:
        runtime = replace(runtime, max_batch=1)
    if args.threads is not None:
        runtime = replace(runtime, threads=args.threads)
    if args.prompt_lookup is not None:
        runtime = replace(runtime, prompt_lookup=args.prompt_lookup)
    if args.speculation is not None:
        runtime = replace(runtime, speculation=args.speculation)
    if args.draft_tokens is not None:
        runtime = replace(runtime, draft_tokens=args.draft_tokens)
    if args.pad_decode:
        runtime = replace(runtime, pad_decode=True)
    if args.memory_mb is not None:
        if args.memory_mb < 0:
            raise ConfigError(f"--memory-mb must be ≥ 0, got {args.memory_mb}")
        runtime = replace(runtime, memory_mb=args.memory_mb)
    board = replace(board, runtime=runtime)
    bundle = load_bundle(resolve_bundle(args.bundle), verify=not args.no_verify)
    if runtime.memory_mb:
        plan = plan_memory(bundle, board)
        board = plan.apply(board)
        print(f"edge-llm: {plan.summary()}", file=sys.stderr, flush=True)
    options = board.runner_options()
    if args.provider:
        options = replace(options, providers=provider_specs(args.provider))
    if args.provider_option:
        overrides = parse_option_overrides(args.provider_option)
        options = replace(options, providers=overlay(options.providers, overrides))
    return Engine(bundle, options), board


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.?)", re.DOTALL)
_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def unescape(value: str) -> str:
    r"""`--stop "\n\n"` means two newlines: the shell passes the backslashes through, and a stop
    string is almost always a newline or a tab. An unknown escape is an error rather than a guess
    (a literal backslash is written `\\`)."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code in _SIMPLE:
            return _SIMPLE[code]
        if code[:1] in ("x", "u") and len(code) > 1:
            return chr(int(code[1:], 16))
        shown = f"\\{code}" if code else "\\ at the end"
        raise argparse.ArgumentTypeError(
            f"{value!r}: unknown escape {shown} (known: \\n \\t \\r \\0 \\\\ \\\" \\' \\xHH \\uXXXX)"
        )

    out = _ESCAPE.sub(one, value)
    if not out:
        raise argparse.ArgumentTypeError("a stop string cannot be empty")
    return out


def prompt_text(prompt: str) -> str:
    """The prompt, refused when empty or blank: raw and chat prompts alike (an empty chat turn
    used to be sent while an empty raw prompt was refused)."""
    if not prompt.strip():
        raise RequestError("the prompt is empty")
    return prompt


def add_provider_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--provider-option",
        action="append",
        default=[],
        metavar="NAME.OPTION=VALUE",
        help="a provider option over the board profile's and the bundle's (repeatable), e.g. "
        "openvino.precision=FP32",
    )


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
    prompt_text(args.prompt)
    params = sampling_params(args)
    engine, _ = load_engine(args, single_stream=True)
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
    engine, _ = load_engine(args, single_stream=True)
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
