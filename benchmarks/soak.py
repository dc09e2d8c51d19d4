"""Memory soak: `edge-llm serve` under a memory budget, driven for D minutes by a mix of session
chats, long prompts near the planned context and concurrent requests; the server's RSS sampled
every few seconds.

In: a bundle (default: the newest `~/.cache/edge-llm/bundles/smollm2-int8-*`), a board profile
(default `configs/boards/cpu-2core.toml`) and `--memory-mb` (default 400). Starts the server as
its own process on a private Unix socket and state file, then runs, until the time is up, with
one socket SDK client per thread:
- `sessions`: one thread cycling through more conversations than the plan keeps live (each turn
  a new user message; their histories grow until the server slides them to fit the context);
- `long`: one thread sending raw prompts that fill the planned context (all but the answer);
- `burst`: `--burst` threads sending short chats at the same time (continuous batching).
Every `--interval` seconds it reads the server's VmRSS (and at the end VmHWM, the peak between
samples) from /proc. Out: `benchmarks/results/soak.{json,md}` and `soak.png` (when matplotlib is
installed): the RSS curve against the budget, the plan the server logged, request counts.

    python benchmarks/soak.py [--bundle DIR] [--config TOML] [--memory-mb 400] [--minutes 10]

On a shared or small machine throughput is low; what this measures is memory, not speed.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm.board import load_board  # noqa: E402
from edge_llm.bundle import load_bundle  # noqa: E402
from edge_llm.client import SocketClient  # noqa: E402
from edge_llm.errors import EdgeLLMError  # noqa: E402
from edge_llm.memory import plan_memory  # noqa: E402
from edge_llm.tokenizer import Tokenizer  # noqa: E402

TEXT = Path("/work/shared/data/wikitext-2/valid.txt")
FALLBACK = (
    "The capital of France is Paris. Small language models run on embedded boards. "
    "A memory budget keeps the runtime inside what the board has. "
) * 200


def default_bundle() -> str:
    found = sorted(glob.glob(os.path.expanduser("~/.cache/edge-llm/bundles/smollm2-int8-*")))
    found = [f for f in found if not f.endswith(".partial")]
    if not found:
        raise SystemExit("no default bundle under ~/.cache/edge-llm/bundles; pass --bundle")
    return found[-1]


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid` in MiB (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def sentences(limit: int = 4000) -> list[str]:
    """Short passages of real text for prompts (WikiText-2 when present)."""
    text = TEXT.read_text(encoding="utf-8", errors="replace") if TEXT.exists() else FALLBACK
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if len(ln) > 80 and not ln.startswith("=")]
    return lines[:limit] or [FALLBACK]


def start_server(
    bundle: str, config: str, memory_mb: int, folder: Path
) -> tuple[subprocess.Popen, Path, Path]:
    sock, log = folder / "edge.sock", folder / "serve.log"
    cmd = [sys.executable, "-m", "edge_llm.cli", "-v", "serve", "--bundle", bundle, "--config", config]
    cmd += ["--memory-mb", str(memory_mb), "--socket", str(sock), "--state", str(folder / "state.sqlite")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    t0 = time.monotonic()
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            proc.kill()
            raise RuntimeError(f"edge-llm serve did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, sock, log


class Driver:
    """The request mix; each thread has its own client and counts what came back."""

    def __init__(self, sock: Path, tokenizer: Tokenizer, context: int, live: int, until: float, seed: int):
        self.sock, self.tok, self.context, self.live, self.until = sock, tokenizer, context, live, until
        self.texts = sentences()
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.turns = itertools.count()

    def done(self) -> bool:
        return time.monotonic() >= self.until

    def text(self) -> str:
        with self.lock:
            return self.rng.choice(self.texts)

    def run(self, kind: str, fields_for: Any) -> None:
        client = SocketClient(str(self.sock), timeout=900.0)
        try:
            while not self.done():
                fields = fields_for()
                try:
                    result = client.generate(request_id=uuid.uuid4().hex, **fields)
                    outcome = f"{kind} ok"
                    with self.lock:
                        self.tokens[f"{kind} prompt"] += int(result.usage.get("prompt_tokens", 0))
                        self.tokens[f"{kind} completion"] += int(result.usage.get("completion_tokens", 0))
                except EdgeLLMError as exc:
                    outcome = f"{kind} {exc.code}"
                    time.sleep(0.5)
                with self.lock:
                    self.counts[outcome] += 1
        finally:
            client.close()

    def session_turn(self) -> dict[str, Any]:
        """The next turn of one of (live + 2) conversations: more than the server keeps live."""
        session = f"soak-{next(self.turns) % (self.live + 2)}"
        ask = f"Summarise in one sentence: {self.text()[:400]}"
        return {"messages": [{"role": "user", "content": ask}], "session": session, "max_tokens": 48}

    def long_prompt(self) -> dict[str, Any]:
        """A raw prompt of real text that leaves room for exactly the answer (+ a small margin)."""
        answer, want = 24, self.context - 24 - 8
        ids: list[int] = []
        while len(ids) < want:
            ids += self.tok.encode(" " + self.text())
        text = self.tok.decode(ids[:want])
        return {"prompt": text, "max_tokens": answer}

    def burst(self) -> dict[str, Any]:
        ask = f"What is this about? {self.text()[:200]}"
        return {"messages": [{"role": "user", "content": ask}], "max_tokens": 40}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the newest default bundle)")
    ap.add_argument("--config", default=str(ROOT / "configs/boards/cpu-2core.toml"))
    ap.add_argument("--memory-mb", type=int, default=400)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--burst", type=int, default=3, help="threads sending short chats at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/soak"))
    args = ap.parse_args(argv)
    bundle_dir = args.bundle or default_bundle()
    bundle = load_bundle(bundle_dir, verify=False)
    plan = plan_memory(bundle, load_board(args.config), args.memory_mb)  # what serve will also plan
    print("\n".join(plan.lines()), flush=True)
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="edge-llm-soak-") as tmp:
        t_start = time.monotonic()
        server, sock, log = start_server(bundle_dir, args.config, args.memory_mb, Path(tmp))
        started_s = time.monotonic() - t_start
        t0 = time.monotonic()
        until = t0 + 60 * args.minutes
        driver = Driver(sock, Tokenizer(bundle), plan.context, plan.sessions, until, args.seed)
        threads = [
            threading.Thread(target=driver.run, args=("sessions", driver.session_turn), daemon=True),
            threading.Thread(target=driver.run, args=("long", driver.long_prompt), daemon=True),
        ]
        threads += [
            threading.Thread(target=driver.run, args=("burst", driver.burst), daemon=True)
            for _ in range(args.burst)
        ]
        try:
            samples.append({"t_s": 0.0, **proc_status(server.pid)})
            for t in threads:
                t.start()
            while not driver.done():
                time.sleep(min(args.interval, max(0.0, driver.until - time.monotonic())))
                samples.append({"t_s": round(time.monotonic() - t0, 1), **proc_status(server.pid)})
                s = samples[-1]
                print(
                    f"t={s['t_s']:6.0f}s  RSS {s['VmRSS']:6.1f} MB  peak {s['VmHWM']:6.1f} MB  "
                    f"{dict(driver.counts)}",
                    flush=True,
                )
            for t in threads:  # requests in flight finish (their RSS counts too)
                t.join(timeout=900)
            final = proc_status(server.pid)
            samples.append({"t_s": round(time.monotonic() - t0, 1), **final})
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        serve_log = log.read_text(errors="replace")
    plan_line = next((ln for ln in serve_log.splitlines() if "memory plan" in ln), "")
    peak_sampled = max(s["VmRSS"] for s in samples)
    results = {
        "bundle": bundle_dir,
        "config": args.config,
        "memory_mb": args.memory_mb,
        "minutes": args.minutes,
        "interval_s": args.interval,
        "server_start_s": round(started_s, 1),
        "plan": {**plan.__dict__, "total_mb": plan.total_mb},
        "serve_plan_line": plan_line,
        "samples": samples,
        "peak_rss_sampled_mb": peak_sampled,
        "peak_rss_hwm_mb": final["VmHWM"],
        "within_budget": final["VmHWM"] <= args.memory_mb,
        "requests": dict(driver.counts),
        "tokens": dict(driver.tokens),
        "server_exit": server.returncode,
    }
    lines = [
        f"Soak: `{Path(bundle_dir).name}`, `{Path(args.config).name}`, `--memory-mb {args.memory_mb}`,"
        f" {args.minutes:g} min, RSS sampled every {args.interval:g} s (MB = MiB).",
        "",
        f"- plan: context {plan.context}, {plan.rows} batch rows, {plan.sessions} live sessions,"
        f" prefill pieces of {plan.prefill_chunk}; planned total {plan.total_mb:.1f} MB",
        f"- peak RSS: {final['VmHWM']:.1f} MB (VmHWM, the kernel's peak); highest sample"
        f" {peak_sampled:.1f} MB; budget {args.memory_mb} MB: "
        + ("inside" if results["within_budget"] else "**over**"),
        f"- requests: {', '.join(f'{k} {v}' for k, v in sorted(driver.counts.items()))}",
        f"- tokens: {', '.join(f'{k} {v}' for k, v in sorted(driver.tokens.items()))}",
        "",
        "| t (s) | RSS MB | peak so far MB |",
        "|---:|---:|---:|",
        *[f"| {s['t_s']:.0f} | {s['VmRSS']:.1f} | {s['VmHWM']:.1f} |" for s in samples],
    ]
    write_results(Path(args.out), results, lines)
    plot(Path(args.out), samples, args.memory_mb, plan.total_mb)
    print("\n".join(lines[:6]))
    return results


def plot(out: Path, samples: list[dict[str, float]], budget: int, planned: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s["t_s"] for s in samples], [s["VmRSS"] for s in samples], marker=".", label="server RSS")
    ax.axhline(budget, color="red", linestyle="--", label=f"budget {budget} MB")
    ax.axhline(planned, color="gray", linestyle=":", label=f"plan {planned:.0f} MB")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, budget * 1.1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
