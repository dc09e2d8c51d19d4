"""What the HTTP transport costs on a board: memory added and latency added against the socket.

In: a bundle. Runs `edge-llm serve` twice as its own process — socket only, then socket + HTTP
(`--http`) — and reads the server's resident memory (VmRSS, after warm-up requests on every
transport it serves) to get the RSS the HTTP extra adds. In the second server it then sends the
same greedy streaming request alternately over the Unix socket (one JSON line, raw) and over
HTTP (`/v1/chat/completions` with `stream`, raw `http.client`, a fresh connection per request as
an OpenAI client without keep-alive would), and reports time to the first content delta and to
the end, median and p90 over `--requests` of each. Clients are deliberately thin so the
difference is the server side's.

Out: printed, and `benchmarks/results/http_overhead.{json,md}` (`--out` to change).

    python benchmarks/http_overhead.py BUNDLE [--requests 30] [--max-tokens 16] [--config BOARD] [--tag NAME]

On a 2-core machine shared with other work, the figures carry that machine's noise: compare
the two columns of one run, not runs across days.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(bundle: str, folder: Path, http_port: int | None, config: str | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "edge_llm.cli", "serve", "--bundle", bundle, "--socket", str(folder / "s")]
    if config:
        cmd += ["--config", config]
    cmd += ["--state", str(folder / f"state-{uuid.uuid4().hex}.sqlite")]
    if http_port is not None:
        cmd += ["--http", f"127.0.0.1:{http_port}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()  # "edge-llm: serving ..." once every transport is up
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"serve did not start: {line}{proc.stderr.read().decode()}")
    return proc


def via_socket(path: Path, max_tokens: int) -> tuple[float, float, str]:
    request = {"id": uuid.uuid4().hex, "messages": QUESTION, "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    first = None
    text = []
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        f = s.makefile("rb")
        for line in f:
            reply = json.loads(line)
            if "delta" in reply:
                first = first or time.perf_counter()
                text.append(reply["delta"])
            if reply.get("done"):
                assert "error" not in reply, reply
                break
    end = time.perf_counter()
    return (first or end) - t0, end - t0, "".join(text)


def via_http(port: int, max_tokens: int) -> tuple[float, float, str]:
    body = json.dumps({"messages": QUESTION, "max_tokens": max_tokens, "stream": True})
    t0 = time.perf_counter()
    first = None
    text = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
        if delta:
            first = first or time.perf_counter()
            text.append(delta)
    end = time.perf_counter()
    conn.close()
    return (first or end) - t0, end - t0, "".join(text)


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_ms": round(statistics.median(xs) * 1000, 2),
        "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1000, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--config", help="board profile for both servers (e.g. threads, spin)")
    ap.add_argument(
        "--tag", default="", help="name of this run in the results (default: the bundle's folder)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "http_overhead"))
    args = ap.parse_args()
    tag = args.tag or Path(args.bundle).name
    folder = Path(tempfile.mkdtemp(prefix="edge-llm-http-"))
    out: dict[str, Any] = {"bundle": tag, "requests": args.requests, "max_tokens": args.max_tokens}
    out["config"] = args.config

    proc = start(args.bundle, folder, None, args.config)
    try:
        for _ in range(3):
            via_socket(folder / "s", args.max_tokens)
        out["rss_socket_only_mib"] = round(rss_mib(proc.pid), 1)
    finally:
        proc.terminate()
        proc.wait(30)
    port = free_port()
    proc = start(args.bundle, folder, port, args.config)
    try:
        for _ in range(3):
            via_socket(folder / "s", args.max_tokens)
            via_http(port, args.max_tokens)
        out["rss_socket_http_mib"] = round(rss_mib(proc.pid), 1)
        runs: dict[str, list[tuple[float, float, str]]] = {"socket": [], "http": []}
        for _ in range(args.requests):  # alternate, so both see the same machine load
            runs["socket"].append(via_socket(folder / "s", args.max_tokens))
            runs["http"].append(via_http(port, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(30)
    texts = {name: {r[2] for r in rs} for name, rs in runs.items()}
    out["same_text"] = texts["socket"] == texts["http"] and len(texts["socket"]) == 1
    out["text"] = sorted(texts["http"])[0]
    for name, rs in runs.items():
        out[name] = {"first_delta": summary([r[0] for r in rs]), "total": summary([r[1] for r in rs])}
    out["rss_added_mib"] = round(out["rss_socket_http_mib"] - out["rss_socket_only_mib"], 1)
    for what in ("first_delta", "total"):
        out[f"{what}_added_p50_ms"] = round(out["http"][what]["p50_ms"] - out["socket"][what]["p50_ms"], 2)
    print(json.dumps(out, indent=1, ensure_ascii=False))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
    results[tag] = out
    path.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    rows = [
        "| bundle | RSS socket only MiB | RSS + HTTP MiB | added MiB | first delta p50 socket / HTTP ms "
        "| total p50 socket / HTTP ms | same text |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        rows.append(
            f"| {r['bundle']} | {r['rss_socket_only_mib']} | {r['rss_socket_http_mib']} "
            f"| {r['rss_added_mib']} "
            f"| {r['socket']['first_delta']['p50_ms']} / {r['http']['first_delta']['p50_ms']} "
            f"| {r['socket']['total']['p50_ms']} / {r['http']['total']['p50_ms']} | {r['same_text']} |"
        )
    path.with_suffix(".md").write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
