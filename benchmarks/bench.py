"""The speed benchmark as a script: this runtime against the peers, same model, same run.

    python benchmarks/bench.py --bundle DIR [--peers] [--runs 5] [--out benchmarks/results]

Writes `<out>/bench.json`, `<out>/bench.md` and `<out>/bench.png` and prints the table; it is
`edge-llm bench` with the output files named (see edge_llm/commands/bench.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_llm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    out = Path("benchmarks/results")
    if "--out" in args:
        i = args.index("--out")
        out = Path(args[i + 1])
        del args[i : i + 2]
    out.mkdir(parents=True, exist_ok=True)
    sys.exit(
        main(
            [
                "bench",
                *args,
                "--json",
                str(out / "bench.json"),
                "--markdown",
                str(out / "bench.md"),
                "--png",
                str(out / "bench.png"),
            ]
        )
    )
