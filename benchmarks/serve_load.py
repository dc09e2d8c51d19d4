"""End-to-end serving load: N clients at once against `edge-llm serve`, over the local socket and
over MQTT, each with the SDK client a device would use.

In: a bundle, and an MQTT broker: `--mqtt HOST:PORT` (default 127.0.0.1:1883, the one on this
machine; skipped with a note when none answers), or `--start-broker default|nodelay` to run a
private `mosquitto` on a free port with its default TCP settings or with `set_tcp_nodelay true`.
Starts `edge-llm serve` as its own process (a Unix socket, and MQTT under a fresh device id),
then for each transport and each N runs `--rounds` rounds of N client threads that each stream
one greedy request (the bench's 21-token chat prompt, `--new-tokens` tokens, EOS ignored) at the
same moment. Then, in this process, the same N requests go straight to a `Scheduler` (no
transport: `edge_llm.bench.concurrent_throughput`) for the transport's share.
Out: per transport and N, aggregate tok/s (median round), time to first chunk and request
latency (p50 / p95 over all requests, client side), and the ratio to the scheduler alone;
printed and written to `benchmarks/results/serve_load.{json,md}`.

    python benchmarks/serve_load.py BUNDLE [--clients 1,4,8] [--rounds 3] [--new-tokens 64]
        [--mqtt HOST:PORT | --start-broker default,nodelay] [--chunk-qos 1,0]

Why the broker setting: mosquitto leaves Nagle's algorithm on for its client sockets by default.
Its PUBACK to a client's request then sits unacknowledged (the client delays its ACK up to
40 ms) and the first reply chunk waits behind it: measured here with one client, first chunk
57 ms with the default and 18 ms with `set_tcp_nodelay true` (the socket transport: 16 ms).
The clients run on the server's machine: on 2 cores they compete with it for CPU, so read the
throughput columns as a lower bound, and compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from edge_llm import bench  # noqa: E402
from edge_llm.client import Client, MqttClient, SocketClient  # noqa: E402


def broker_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def start_broker(folder: Path, nodelay: bool) -> tuple[subprocess.Popen, int]:
    """A private mosquitto on a free port (anonymous, local only); (process, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = folder / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    conf.write_text("\n".join(lines + (["set_tcp_nodelay true"] if nodelay else [])) + "\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not broker_up("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() - t0 > 10:
            proc.kill()
            raise RuntimeError(f"mosquitto did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    return proc, port


def start_server(
    bundle: str, sock: Path, mqtt: str | None, device: str, threads: int, chunk_qos: int = 1
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edge_llm.cli", "serve", "--bundle", bundle, "--socket", str(sock)]
    cmd += ["--threads", str(threads), "--state", str(sock.with_suffix(".sqlite"))]
    if mqtt:
        board = sock.with_name("board.toml")
        board.write_text(f"[mqtt]\nchunk_qos = {chunk_qos}\n")
        cmd += ["--config", str(board), "--mqtt", mqtt, "--device", device]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() - t0 > 60:
            err = proc.stderr.read() if proc.stderr else ""
            proc.kill()
            raise RuntimeError(f"edge-llm serve did not start: {err[-2000:]}")
        time.sleep(0.1)
    return proc


def one_request(client: Client, n_new: int) -> dict[str, float]:
    t0 = time.perf_counter()
    first = None
    stream = client.stream(bench.SHORT_PROMPT, max_tokens=n_new, ignore_eos=True, request_id=uuid.uuid4().hex)
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if stream.result is None:
        raise RuntimeError("stream ended without a result")
    tokens = int(stream.result.usage["completion_tokens"])
    return {"ttfc_ms": ((first or end) - t0) * 1e3, "latency_ms": (end - t0) * 1e3, "tokens": tokens}


def load_round(clients: list[Client], n_new: int) -> tuple[float, list[dict[str, float]]]:
    """All clients send one request at the same moment; (aggregate tok/s, per-request figures)."""
    barrier = threading.Barrier(len(clients) + 1)
    results: list[dict[str, float]] = []
    errors: list[BaseException] = []

    def work(c: Client) -> None:
        barrier.wait()
        try:
            results.append(one_request(c, n_new))
        except BaseException as exc:  # reported below: the round fails
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(clients)} requests failed: {errors[0]!r}")
    return sum(r["tokens"] for r in results) / wall, results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_transport(
    make: Callable[[], Client], sizes: list[int], rounds: int, n_new: int
) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        clients = [make() for _ in range(n)]
        try:
            load_round(clients, n_new)  # warm-up: connections, the server's first batch cache
            rates, reqs = [], []
            for _ in range(rounds):
                rate, got = load_round(clients, n_new)
                rates.append(rate)
                reqs += got
        finally:
            for c in clients:
                c.close()
        ttfc, lat = [r["ttfc_ms"] for r in reqs], [r["latency_ms"] for r in reqs]
        rows.append(
            {
                "clients": n,
                "tok_s": statistics.median(rates),
                "tok_s_rounds": rates,
                "ttfc_ms_p50": pct(ttfc, 0.5),
                "ttfc_ms_p95": pct(ttfc, 0.95),
                "latency_ms_p50": pct(lat, 0.5),
                "latency_ms_p95": pct(lat, 0.95),
                "requests": len(reqs),
            }
        )
        print(rows[-1], flush=True)
    return rows


def scheduler_alone(bundle: str, sizes: list[int], rounds: int, n_new: int, threads: int) -> dict[int, float]:
    from edge_llm.engine import Engine
    from edge_llm.runner import RunnerOptions

    engine = Engine.load(bundle, RunnerOptions(threads=threads, max_batch=max(sizes)))
    ids = engine.tokenizer.encode(bench.SHORT_PROMPT)
    out = {}
    for n in sizes:
        bench.concurrent_throughput(engine, ids, n, n_new, f"warm{n}")
        runs = [bench.concurrent_throughput(engine, ids, n, n_new, f"s{n}-{r}") for r in range(rounds)]
        out[n] = statistics.median(runs)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--mqtt", default="127.0.0.1:1883", help="broker HOST:PORT ('' to skip MQTT)")
    where.add_argument(
        "--start-broker",
        help="private mosquitto brokers to run, comma-separated: default (its TCP settings), nodelay",
    )
    ap.add_argument("--chunk-qos", default="1", help="MQTT chunk QoS values to run, comma-separated (0,1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_load"))
    args = ap.parse_args(argv)
    qos_values = [q.strip() for q in args.chunk_qos.split(",")]
    if not qos_values or any(q not in ("0", "1") for q in qos_values):
        ap.error(f"--chunk-qos {args.chunk_qos!r}: 0 and/or 1")
    try:
        sizes = [int(n) for n in args.clients.split(",")]
    except ValueError:
        ap.error(f"--clients {args.clients!r}: expected comma-separated integers")
    if not sizes or min(sizes) < 1 or args.rounds < 1 or args.new_tokens < 1:
        ap.error("--clients, --rounds and --new-tokens must be >= 1")
    kinds = args.start_broker.split(",") if args.start_broker else []
    if any(k not in ("default", "nodelay") for k in kinds):
        ap.error(f"--start-broker {args.start_broker!r}: default and/or nodelay")
    results: dict[str, Any] = {"transports": {}, "notes": []}
    with tempfile.TemporaryDirectory() as tmp:
        # The socket on a server of its own, then one server per broker (a server has one broker).
        targets: list[tuple[str, str | None, int]] = [("socket", None, 1)]
        brokers: list[tuple[str, str]] = [(f"{k} broker", k) for k in kinds]
        if not kinds and args.mqtt:
            host, _, port = args.mqtt.rpartition(":")
            if broker_up(host, int(port)):
                brokers.append((f"broker {args.mqtt}", args.mqtt))
            else:
                results["notes"].append(f"MQTT skipped: no broker answered at {args.mqtt!r}")
        for label, where_to in brokers:
            targets += [(f"mqtt ({label}, chunks QoS {q})", where_to, int(q)) for q in qos_values]
        for i, (name, where_to, chunk_qos) in enumerate(targets):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            broker, mqtt = None, where_to
            if where_to in ("default", "nodelay"):
                broker, bport = start_broker(folder, where_to == "nodelay")
                mqtt = f"127.0.0.1:{bport}"
            device = f"load-{uuid.uuid4().hex[:8]}"
            sock = folder / "edge.sock"
            server = start_server(args.bundle, sock, mqtt, device, args.threads, chunk_qos)
            try:
                if mqtt is None:
                    make: Callable[[], Client] = lambda sock=sock: SocketClient(str(sock))  # noqa: E731
                else:
                    host, _, port = mqtt.rpartition(":")
                    make = lambda h=host, p=int(port), d=device: MqttClient(h, p, device=d)  # noqa: E731
                print(f"serve_load: {name}", flush=True)
                results["transports"][name] = run_transport(make, sizes, args.rounds, args.new_tokens)
            finally:
                server.terminate()
                server.wait(timeout=30)
                if broker is not None:
                    broker.terminate()
                    broker.wait(timeout=10)
    alone = scheduler_alone(args.bundle, sizes, args.rounds, args.new_tokens, args.threads)
    results["scheduler_alone_tok_s"] = {str(n): v for n, v in alone.items()}
    for rows in results["transports"].values():
        for r in rows:
            r["vs_scheduler_alone"] = r["tok_s"] / alone[r["clients"]]
    results |= {"cpu": bench.cpu_info(), "settings": vars(args), "pid": os.getpid()}
    lines = [
        f"`{Path(args.bundle).name}`, {args.new_tokens} new tokens per request (21-token prompt, greedy,"
        f" EOS ignored), {args.threads} server threads, median of {args.rounds} rounds; latency and"
        " time to first chunk are client side, p50 / p95 over every request.",
        "",
        "| transport | clients | tok/s | vs scheduler alone | first chunk ms p50 / p95 "
        "| request ms p50 / p95 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results["transports"].items():
        lines += [
            f"| {name} | {r['clients']} | {r['tok_s']:.1f} | {r['vs_scheduler_alone']:.2f}× "
            f"| {r['ttfc_ms_p50']:.0f} / {r['ttfc_ms_p95']:.0f} "
            f"| {r['latency_ms_p50']:.0f} / {r['latency_ms_p95']:.0f} |"
            for r in rows
        ]
    lines += ["", *[f"Note: {n}" for n in results["notes"]]]
    write_results(Path(args.out), results, lines)
    return results


if __name__ == "__main__":
    main()
