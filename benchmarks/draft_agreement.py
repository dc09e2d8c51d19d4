"""How often the trained draft's first guess is the main graph's next greedy token, measured in the
runtime path (issue 17 item 1: runtime acceptance far below the stage's held-out agreement).

In: a bundle with a draft. For each held-out sequence (WikiText-2 valid [0, 0.1), the draft never
trains on it; and, with `--chats FILE`, held-out teacher-written chats the stage saved) the engine
prefills a prompt of `--prompt` tokens and then, one token per step through
`Engine.decode_one_token` (what plain decoding runs, padded under `--pad-decode`):
  - forced: feeds the sequence's own next token x and asks the draft (hidden state of the step
    before, x) for the token after; agreement = that guess is the main graph's greedy token there
    (what the stage reports, but on 1-token-forward states);
  - multi: the same over the states of one multi-token forward (what the stage trains on);
  - free: plain greedy decoding from the prompt, the draft fed the main graph's own token (what
    speculation's first draft sees).
An eagle1 draft keeps every pair from the prompt's end on in its history (as in speculation).
Out: printed and written to `benchmarks/results/draft_agreement.{json,md}`.

    python benchmarks/draft_agreement.py BUNDLE [--chats heldout.json] [--pad-decode]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.engine import Engine, Slot  # noqa: E402
from edge_llm.runner import RunnerOptions  # noqa: E402
from edge_llm.speculate import DraftKV  # noqa: E402


def guess(engine: Engine, kv: DraftKV | None, hidden: np.ndarray, token: int) -> int:
    """The draft's first guess (a full-vocabulary id) from (hidden state, next token); an eagle1
    draft (`kv`: its cache) also keeps the pair in its history, as speculation does."""
    assert engine.draft is not None
    if kv is None:
        _, logits = engine.draft(hidden, token)
    else:
        _, logits = engine.draft.step(kv, hidden[None], [token], commit=True)
    return int(engine.draft.vocab[int(np.argmax(logits))])


def history(engine: Engine) -> DraftKV | None:
    """An empty history for an eagle1 draft (None for the stateless one): one per sequence."""
    assert engine.draft is not None
    return DraftKV(engine.draft.width) if engine.draft.stateful else None


def forced(engine: Engine, ids: list[int], prompt: int) -> tuple[int, int, int]:
    """(positions, agreements on 1-token-forward states, agreements on multi-token states)."""
    slot = Slot()
    logits, _ = engine.prefill(ids[:prompt], slot)
    hidden = engine.runner.hidden[0, -1].copy()
    one = n = 0
    kv = history(engine)
    for t in range(prompt, len(ids) - 1):
        # state after ids[t-1]; the draft sees ids[t] and guesses the greedy token after it
        d = guess(engine, kv, hidden, ids[t])
        logits = engine.decode_one_token(ids[t], slot)
        hidden = engine.runner.hidden[0, engine.last_pos].copy()
        one += d == int(np.argmax(logits))
        n += 1
    # One forward over the whole sequence: the states the stage trains on.
    cache = engine.runner.empty(1)
    full = engine.runner.forward(np.asarray([ids], np.int64), cache, all_logits=True)[0]
    states = engine.runner.hidden[0].copy()
    kv = history(engine)
    multi = sum(
        guess(engine, kv, states[t - 1], ids[t]) == int(np.argmax(full[t]))
        for t in range(prompt, len(ids) - 1)
    )
    return n, one, multi


def free(engine: Engine, ids: list[int], new: int) -> tuple[int, int]:
    """(steps, agreements) over `new` plain greedy steps from prompt `ids`."""
    slot = Slot()
    logits, _ = engine.prefill(ids, slot)
    hidden = engine.runner.hidden[0, -1].copy()
    token = int(np.argmax(logits))
    agree = 0
    kv = history(engine)
    for _ in range(new):
        d = guess(engine, kv, hidden, token)
        logits = engine.decode_one_token(token, slot)
        hidden = engine.runner.hidden[0, engine.last_pos].copy()
        token = int(np.argmax(logits))
        agree += d == token
    return new, agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--text", type=Path, default=Path("/work/shared/data/wikitext-2/valid.txt"))
    ap.add_argument("--chats", type=Path, help="held-out chats: JSON [[ids, prompt length], ...]")
    ap.add_argument("--sequences", type=int, default=4, help="text sequences (and chats at most)")
    ap.add_argument("--length", type=int, default=160, help="tokens per text sequence")
    ap.add_argument("--prompt", type=int, default=32, help="text tokens prefilled before measuring")
    ap.add_argument("--new-tokens", type=int, default=96, help="free-running greedy steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pad-decode", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "draft_agreement"))
    args = ap.parse_args()
    opts = RunnerOptions(threads=args.threads, max_batch=1, speculation="draft", pad_decode=args.pad_decode)
    engine = Engine.load(args.bundle, opts)
    text = args.text.read_text(encoding="utf-8")
    held = text[: len(text) // 10]  # the draft trains on [0.1, 1.0)
    pieces = [p for p in held.split("\n") if len(p) > 800]
    seqs = {
        "text": [(engine.tokenizer.encode(p)[: args.length], args.prompt) for p in pieces[: args.sequences]]
    }
    if args.chats:
        seqs["chat"] = [(ids, n) for ids, n in json.loads(args.chats.read_text())[: args.sequences]]
    doc: dict = {"bundle": str(args.bundle), "pad_decode": args.pad_decode, "threads": args.threads}
    lines = [
        f"Draft step-1 agreement in the runtime path, bundle {args.bundle}, pad_decode {args.pad_decode}.",
        "",
    ]
    lines += ["| data | positions | forced, 1-token states | forced, multi-token states | free greedy |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for name, items in seqs.items():
        n = one = multi = fn = fa = 0
        for ids, prompt in items:
            a, b, c = forced(engine, ids, prompt)
            n, one, multi = n + a, one + b, multi + c
            x, y = free(engine, ids[:prompt], args.new_tokens)
            fn, fa = fn + x, fa + y
        row = {
            "positions": n,
            "forced_1token": one / n,
            "forced_multi": multi / n,
            "free_steps": fn,
            "free": fa / fn,
        }
        doc[name] = row
        lines.append(f"| {name} | {n} | {one / n:.3f} | {multi / n:.3f} | {fa / fn:.3f} ({fn} steps) |")
        print(lines[-1], flush=True)
    doc["load_avg"] = os.getloadavg()
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}."]
    write_results(Path(args.out), doc, lines)


if __name__ == "__main__":
    main()
