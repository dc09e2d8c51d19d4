"""What each part of a serving process costs in RSS: the figures behind `edge_llm/memory.py`.

In: a bundle (default: the newest `~/.cache/edge-llm/bundles/smollm2-int8-*`). Each measurement
runs in a fresh interpreter (so one arena's high-water mark does not hide the next) and reads
VmRSS / VmHWM from /proc/self/status after each step:
- `imports`: Python + numpy + onnxruntime + tokenizers + the engine; `+ server` the serving
  modules and socket transport; `+ paho` the MQTT transport;
- `tokenizer`: loading tokenizer.json (compared with its size);
- `session`: creating the ORT session (the weights as ORT holds them; VmHWM: the loading peak);
- `workspace C@T`: after feeding T prompt tokens in pieces of C into one fresh row, RSS minus the
  session's and minus the KV pages written (ORT's arena keeps its largest workspace);
- `structured` (where llguidance is installed): importing it, building its view of the tokenizer
  (what the engine does on the first JSON request and keeps), and one json_object constraint's
  first token mask.
Out: printed, and `benchmarks/results/memory_costs.{json,md}`.

    python benchmarks/memory_costs.py [--bundle DIR] [--points 16@16,256@256,256@2000,...]

RSS depends on the CPU, the onnxruntime build and the allocator: rerun it on the board and
compare with the constants in `edge_llm/memory.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from benchmarks.soak import default_bundle  # noqa: E402

CHILD = r"""
import json, sys
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out
steps = {"python": status()}
import numpy as np, onnxruntime, tokenizers
from edge_llm.engine import Engine
steps["imports"] = status()
from edge_llm.server import Server
from edge_llm.transports.socket import SocketTransport
steps["server"] = status()
from edge_llm.transports.mqtt import MqttTransport
steps["paho"] = status()
from edge_llm.board import RunnerOptions
from edge_llm.bundle import load_bundle
from edge_llm.tokenizer import Tokenizer
bundle = load_bundle(sys.argv[1], verify=False)
tok = Tokenizer(bundle)
steps["tokenizer"] = status()
engine = Engine(bundle, RunnerOptions(threads=2, max_batch=1))
steps["session"] = status()
llguidance = None
if sys.argv[3] == "0":  # only the base run: the workspace runs must not carry its ~4 MiB
    try:
        import llguidance
    except ImportError:
        pass
if llguidance is not None:
    from edge_llm.constrain import Grammars
    from edge_llm.structured import ResponseFormat
    steps["structured_import"] = status()
    grammars = Grammars(bundle.tokenizer_path.read_text(encoding="utf-8"), bundle.architecture.vocab_size,
                        engine.tokenizer.eos_ids)
    steps["structured_tokenizer"] = status()
    grammars.constraint(ResponseFormat("json_object")).allowed()
    steps["structured_constraint"] = status()
chunk, total = int(sys.argv[2]), int(sys.argv[3])
if total:
    cache = engine.runner.empty(1)
    ids = np.random.RandomState(0).randint(100, bundle.architecture.vocab_size - 100, size=(1, total))
    for start in range(0, total, chunk):
        engine.runner.forward(ids[:, start : start + chunk], cache)
    steps["prefill"] = status()
print(json.dumps(steps))
"""


def measure(bundle: str, chunk: int, total: int) -> dict[str, dict[str, float]]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, bundle, str(chunk), str(total)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kv_pages_mb(bundle: Any, tokens: int) -> float:
    """KV bytes one row commits for `tokens` positions (whole 4 KiB pages per head strip)."""
    a = bundle.architecture
    strip = -(-tokens * a.head_dim * 4 // 4096) * 4096
    return a.num_layers * 2 * a.num_kv_heads * strip / 2**20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from edge_llm.bundle import load_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument(
        "--points",
        default="16@16,256@256,512@512,256@2000,512@2000,2000@2000",
        help="prefill pieces C@T: T tokens fed in pieces of C",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_costs"))
    args = ap.parse_args(argv)
    bundle_dir = args.bundle or default_bundle()
    bundle = load_bundle(bundle_dir, verify=False)
    files = {name: int(meta["bytes"]) for name, meta in bundle.files.items()}
    graph_mb = sum(b for n, b in files.items() if n.startswith(bundle.graph.file)) / 2**20
    tokenizer_mb = files.get(bundle.tokenizer.file, 0) / 2**20
    base = measure(bundle_dir, 1, 0)
    rss = {k: v["VmRSS"] for k, v in base.items()}
    out: dict[str, Any] = {
        "bundle": bundle_dir,
        "steps": base,
        "baseline_mb": {"imports": rss["imports"], "server": rss["server"], "paho": rss["paho"]},
        "tokenizer_mb": rss["tokenizer"] - rss["paho"],
        "tokenizer_file_mb": tokenizer_mb,
        "weights_mb": rss["session"] - rss["tokenizer"],
        "graph_files_mb": graph_mb,
        "load_transient_mb": base["session"]["VmHWM"] - rss["session"],
        "workspace": [],
    }
    if "structured_constraint" in rss:
        out["structured_mb"] = {
            "import": rss["structured_import"] - rss["session"],
            "tokenizer": rss["structured_tokenizer"] - rss["structured_import"],
            "constraint": rss["structured_constraint"] - rss["structured_tokenizer"],
        }
    for point in args.points.split(","):
        chunk, total = (int(x) for x in point.split("@"))
        got = measure(bundle_dir, chunk, total)
        kv = kv_pages_mb(bundle, total)
        ws = got["prefill"]["VmRSS"] - got["session"]["VmRSS"] - kv
        out["workspace"].append({"chunk": chunk, "context": total, "workspace_mb": ws, "kv_mb": kv})
        print(f"workspace {chunk}@{total}: {ws:.1f} MB (KV {kv:.1f} MB)", flush=True)
    lines = [
        f"RSS costs of `{Path(bundle_dir).name}` (MB = MiB; fresh interpreter per row; VmRSS).",
        "",
        "| part | MB | note |",
        "|---|---:|---|",
        f"| imports (python, numpy, onnxruntime, tokenizers, engine) | {rss['imports']:.1f} | |",
        f"| + server and socket modules | {rss['server'] - rss['imports']:.1f} | |",
        f"| + paho (MQTT) | {rss['paho'] - rss['server']:.1f} | |",
        f"| tokenizer | {out['tokenizer_mb']:.1f} | tokenizer.json {tokenizer_mb:.2f} MB |",
        f"| weights after session creation | {out['weights_mb']:.1f} | graph files {graph_mb:.1f} MB |",
        f"| loading transient (VmHWM - VmRSS) | {out['load_transient_mb']:.1f} | start-up only |",
        *[
            f"| structured output: {part} | {mb:.1f} | llguidance, on the first JSON request |"
            for part, mb in out.get("structured_mb", {}).items()
        ],
        *[
            f"| workspace, {w['chunk']}-token pieces over {w['context']} | {w['workspace_mb']:.1f} "
            f"| minus {w['kv_mb']:.1f} MB of KV pages |"
            for w in out["workspace"]
        ],
    ]
    write_results(Path(args.out), out, lines)
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
