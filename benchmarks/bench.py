"""The speed benchmark as a script: this runtime against the peers, same model, same run.

    python benchmarks/bench.py [--bundle DIR] [--peers] [--peer-systems llamacpp,ortgenai]
                               [--chats 3] [--rounds 3] [--runs 5] [--out benchmarks/results]

Writes `<out>/bench.json`, `<out>/bench.md` and `<out>/bench.png` and prints the table. It is
`edge-llm bench` (edge_llm/commands/bench.py) plus what only a source checkout has: `--peers`
(llama.cpp, onnxruntime-genai, transformers through `benchmarks/peers.py`, beside this file) and
WikiText-2 from `../shared/data` as the long prompt's text.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The checkout's root, not this script's folder: `python -P` (the project's way to run scripts)
# leaves the script's folder off sys.path, and `import peers` failed there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers
from edge_llm.cli import Parser, run_handler
from edge_llm.commands import bench


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="benchmarks/bench.py", description=__doc__.splitlines()[0])
    bench.add_arguments(p, outputs=False)
    p.add_argument("--peers", action="store_true", help="also run llama.cpp, onnxruntime-genai, transformers")
    p.add_argument(
        "--peer-systems",
        type=lambda v: [x for x in v.split(",") if x],
        default=list(peers.SYSTEMS),
        help="which peers --peers runs, comma-separated",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="bench.json/md/png go here")
    if p.get_default("text") is None and peers.WIKITEXT.is_file():  # $EDGE_LLM_WIKITEXT wins
        p.set_defaults(text=peers.WIKITEXT)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.json, args.markdown, args.png = (args.out / f"bench.{ext}" for ext in ("json", "md", "png"))
    return run_handler(lambda a: bench.run(a, peers.run_peer if a.peers else None), args)


if __name__ == "__main__":
    sys.exit(main())
