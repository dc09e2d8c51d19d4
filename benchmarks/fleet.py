"""A simulated fleet: N `edge-llm serve` boards behind one broker, shaped links, kills, a dropped link.

Needs root (network namespaces, cgroups) and mosquitto. Layout and link shaping: `benchmarks/netns.py`
(each board in its own network namespace with its own link to the broker's namespace, delay ±
jitter and loss on every link each way, a CPU quota per board). Each board is
`edge-llm serve --fleet GROUP --device fleet-b<i> --state <its own file>` with one ORT thread;
the tiny random test model by default (2 shared cores here), `--bundle` for a real one.

Clients: C threads, each an SDK `MqttClient(fleet=True)` (MQTT 5, a fixed client id, a persistent
session, QoS 1) sending its share of M requests one after another to the fleet topic, so the broker
gives each to one board of the shared subscription. Meanwhile, at fixed shares of the requests
done: boards are killed (SIGKILL) and restarted `--down-s` later on the same state file, and one
link drops for `--link-down-s` (10 s). The clients use only what the SDK does (same-id resends
after silence or a reconnect).

Out (printed, and `benchmarks/results/fleet.{json,md}`):
- at the application: requests answered exactly once, lost (an exception or no return), and
  duplicated (a second `Result` for one id, or one carrying another id);
- latency p50/p99/max (from `generate()` called to it returning);
- load per board: the request ids each board answered, read from its state file's stored finals
  (so it spans the board's restarts); ids answered by more than one board (generated twice: a
  resend that reached another board while the first was dead, cut off or slow);
- on the wire (a tap): request copies published (first sends + SDK resends), finals published.

    sudo python benchmarks/fleet.py [--boards 8] [--requests 400] [--clients 8] [--bundle DIR]
    python -m benchmarks.netns clean-stale    # namespaces left by a run that was SIGKILLed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
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
sys.path.insert(0, str(ROOT / "tests"))

from mosquitto import Broker  # noqa: E402  (tests/mosquitto.py)

from benchmarks import netns  # noqa: E402
from benchmarks.faults import wait_for, wire_tap  # noqa: E402
from benchmarks.fuzz_serve import drain, tiny_bundle  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402

PORT = 1883  # inside the broker's own namespace, nothing else listens
GROUP = "g1"


class Board:
    """One `edge-llm serve` in its namespace, restartable on the same state file."""

    def __init__(self, i: int, net: netns.Net, bundle: str, work: Path, threads: int) -> None:
        self.i, self.net, self.bundle, self.threads = i, net, bundle, threads
        self.device = f"fleet-b{i}"
        self.state = work / f"b{i}" / "state.sqlite"
        self.state.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[str] | None = None
        self.logs: list[list[str]] = []  # stderr lines of each start
        self.starts = self.kills = 0

    def start(self, timeout: float = 120.0) -> None:
        cmd = [*self.net.exec_prefix(self.net.board_ns[self.i]), *self.net.cpu.command_prefix(self.i)]
        cmd += [sys.executable, "-m", "edge_llm.cli"]
        cmd += ["serve", "--bundle", self.bundle, "--threads", str(self.threads), "--state", str(self.state)]
        cmd += ["--mqtt", f"{self.net.broker_ip(self.i)}:{PORT}", "--device", self.device, "--fleet", GROUP]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.net.cpu.attach(self.i, self.proc.pid)  # `ip netns exec` execs: the same pid serves
        lines = drain(self.proc)
        self.starts += 1
        # serve prints this once its transports are up (MQTT: subscriptions confirmed).
        if not wait_for(lambda: any("edge-llm: serving" in x for x in lines) or self.proc.poll() is not None,
                        timeout):  # fmt: skip
            raise RuntimeError(f"{self.device} did not come up in {timeout:g} s")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.device} exited: " + "\n".join(lines[-20:]))
        self.logs.append(lines)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def answered(self) -> set[str]:
        """Request ids whose final this board stored (all its lives: the state file persists)."""
        if not self.state.exists():
            return set()
        with sqlite3.connect(self.state) as db:
            return {row[0] for row in db.execute("SELECT id FROM finals")}


class Clients:
    def __init__(self, host: str, n: int, ids: list[str], max_tokens: int, timeout: float, resend_s: float,
                 stream: bool) -> None:  # fmt: skip
        self.host, self.n, self.ids, self.stream = host, n, ids, stream
        self.stream_mismatch = 0  # streamed deltas that do not add up to the final text
        self.max_tokens, self.timeout, self.resend_s = max_tokens, timeout, resend_s
        self.lock = threading.Lock()
        self.results: Counter[str] = Counter()  # id -> Results the application got
        self.wrong_id = 0
        self.latency: dict[str, float] = {}
        self.errors: Counter[str] = Counter()
        self.done = 0

    def run(self, k: int) -> None:
        from edge_llm.client import MqttClient, RetryPolicy

        retry = RetryPolicy(resend_after_s=self.resend_s)
        with MqttClient(self.host, PORT, fleet=True, client_id=f"fleet-client-{k}", session_expiry_s=600,
                        timeout=self.timeout, retry=retry) as c:  # fmt: skip
            for rid in self.ids[k :: self.n]:
                t0 = time.monotonic()
                try:
                    prompt = f"Request {rid}: say something."
                    if self.stream:  # deltas may come from two boards (a resend): they must add up
                        s = c.stream(prompt, max_tokens=self.max_tokens, ignore_eos=True, request_id=rid)
                        text = "".join(s)
                        assert s.result is not None
                        r = s.result
                        with self.lock:
                            self.stream_mismatch += text != r.text
                    else:
                        r = c.generate(prompt, max_tokens=self.max_tokens, ignore_eos=True, request_id=rid)
                    with self.lock:
                        self.results[r.id] += 1
                        self.wrong_id += r.id != rid
                        self.latency[rid] = time.monotonic() - t0
                except Exception as exc:  # the application got no answer: lost
                    with self.lock:
                        self.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                with self.lock:
                    self.done += 1


class Tap:
    """Every request copy sent to the fleet topic and every final published (a plain subscriber)."""

    def __init__(self, host: str) -> None:
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.finals: Counter[str] = Counter()
        self.texts: dict[str, set[str]] = {}
        self.client = wire_tap(host, PORT, f"fleet-tap-{uuid.uuid4().hex[:6]}",
                               ["edge-llm/fleet/generate", "edge-llm/reply/#"], self.on_message)  # fmt: skip

    def on_message(self, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return
        with self.lock:
            if msg.topic == "edge-llm/fleet/generate":
                self.sent[body["id"]] += 1
            elif body.get("done"):
                self.finals[body["id"]] += 1
                self.texts.setdefault(body["id"], set()).add(str(body.get("text")))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


RTT_PROBE = """
import socket, statistics, sys, time
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()
    times.append((time.perf_counter() - t) * 1e3)
print(statistics.median(times), max(times))
"""


def link_rtt_ms(net: netns.Net, i: int, n: int = 20) -> list[float]:
    """Median and max TCP connect time (SYN to SYN-ACK: one round trip) from board i's namespace
    to the broker: evidence that the link shaping is in place."""
    cmd = [*net.exec_prefix(net.board_ns[i]), sys.executable, "-c", RTT_PROBE]
    cmd += [net.broker_ip(i), str(PORT), str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return [round(float(x), 1) for x in out.stdout.split()] if out.returncode == 0 else []


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def schedule(kills: int, link_at: float) -> list[tuple[float, str]]:
    """(share of requests done, action): kills spread over 10%..85%, the link drop at `link_at`."""
    out = [(0.10 + 0.75 * k / max(1, kills - 1), "kill") for k in range(kills)] if kills else []
    return sorted([*out, (link_at, "link")])


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boards", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--bundle", help="bundle folder (default: build the tiny test model)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="ORT threads per board")
    ap.add_argument("--cpu", type=float, default=0.25, help="CPU quota per board, in cores (0: none)")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="each way, per board link")
    ap.add_argument("--jitter-ms", type=float, default=10.0)
    ap.add_argument("--loss-pct", type=float, default=1.0)
    ap.add_argument("--shaper", choices=("auto", "netem", "tun"), default="auto")
    ap.add_argument("--kills", type=int, default=4, help="board kills (-9) during the run")
    ap.add_argument("--down-s", type=float, default=3.0, help="a killed board restarts after this")
    ap.add_argument("--link-down-s", type=float, default=10.0)
    ap.add_argument("--resend-after-s", type=float, default=10.0, help="SDK RetryPolicy.resend_after_s")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, inside the SDK")
    ap.add_argument("--stream", action="store_true", help="stream (check deltas add up to the final)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fleet")
    args = ap.parse_args(argv)
    problem = netns.netns_works()
    if problem is not None:
        raise SystemExit(f"fleet: needs root and network namespaces: {problem}")
    stale = netns.clean_stale()
    # SIGTERM/SIGHUP end the run like Ctrl-C does: through the `finally` below, which cleans up.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    rng = random.Random(args.seed)
    # When and how busy the host was: timings on 2 shared cores mean little without it.
    when = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="edge-llm-fleet-"))
    bundle = args.bundle or str(tiny_bundle(work))
    shape = netns.Netem(args.delay_ms, args.jitter_ms, args.loss_pct)
    with netns.Net(args.boards, shape, args.cpu, args.shaper) as net:
        wrap = tuple(net.exec_prefix(net.broker_ns))
        broker = Broker(work / "broker", host=net.broker_client_ip, port=PORT, bind="", wrap=wrap,
                        extra_config="set_tcp_nodelay true")  # fmt: skip
        boards = [Board(i, net, bundle, work, args.threads) for i in range(args.boards)]
        tap: Tap | None = None
        try:
            broker.start()
            rtt = link_rtt_ms(net, 0)
            print(f"link RTT board 0 -> broker (TCP connect, median/max of 20): {rtt} ms", flush=True)
            t_start = time.monotonic()
            for b in boards:  # one at a time: each load is CPU-bound on this machine
                b.start()
            boot_s = time.monotonic() - t_start
            tap = Tap(net.broker_client_ip)
            ids = [f"fleet-{i}-{uuid.uuid4().hex[:8]}" for i in range(args.requests)]
            clients = Clients(net.broker_client_ip, args.clients, ids, args.max_tokens, args.timeout,
                              args.resend_after_s, args.stream)  # fmt: skip
            threads = [threading.Thread(target=clients.run, args=(k,), daemon=True)
                       for k in range(args.clients)]  # fmt: skip
            events: list[dict[str, Any]] = []
            t0 = time.monotonic()

            def mark(what: str) -> None:
                events.append({"t_s": round(time.monotonic() - t0, 2), "done": clients.done, "event": what})
                e = events[-1]
                print(f"[{e['t_s']:7.2f} s] {e['done']:5d}/{args.requests} done: {what}", flush=True)

            for t in threads:
                t.start()
            victims = list(range(args.boards))
            rng.shuffle(victims)
            link_board = victims.pop()
            for share, action in schedule(args.kills, 0.45):
                wait_for(lambda n=share * args.requests: clients.done >= n, args.timeout)
                if action == "link":
                    net.link(link_board, up=False)
                    mark(f"link of {boards[link_board].device} down")
                    time.sleep(args.link_down_s)
                    net.link(link_board, up=True)
                    mark(f"link of {boards[link_board].device} up")
                    continue
                b = boards[victims[sum(x.kills for x in boards) % len(victims)]]
                b.kill()
                mark(f"{b.device} killed (SIGKILL)")
                time.sleep(args.down_s)
                b.start()
                mark(f"{b.device} restarted")
            for t in threads:
                t.join(args.timeout + 60)
            mark("clients finished")
            elapsed = time.monotonic() - t0
            time.sleep(2.0)  # late finals (a board that got a request twice) reach the tap
            when["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            if tap is not None:
                tap.close()
            # All boards get SIGTERM before any is waited for: one at a time, boards capped at a
            # quarter core on a loaded host took over a minute to stop (test_fleet, load 9).
            for b in boards:
                b.terminate()
            for b in boards:
                b.stop()
            broker.stop()
        leftovers_before = net.leftovers()
    left = net.leftovers()
    doc = report(args, net, boards, clients, tap, ids, events, elapsed, boot_s, bundle, rtt, when)
    doc["cleanup"] = {"stale_removed_at_start": stale, "present_before_cleanup": len(leftovers_before),
                      "left_after_cleanup": left}  # fmt: skip
    write_results(args.out, doc, doc.pop("_markdown"))
    return doc


def report(args: argparse.Namespace, net: netns.Net, boards: list[Board], clients: Clients, tap: Any,
           ids: list[str], events: list[dict[str, Any]], elapsed: float, boot_s: float,
           bundle: str, rtt: list[float], when: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    lost = [rid for rid in ids if clients.results[rid] == 0]
    once = sum(1 for rid in ids if clients.results[rid] == 1)
    dup = sum(max(0, n - 1) for n in clients.results.values()) + clients.wrong_id
    lat = [clients.latency[r] for r in ids if r in clients.latency]
    per_board = {b.device: b.answered() & set(ids) for b in boards}
    where = Counter(rid for got in per_board.values() for rid in got)
    spread = {d: len(got) for d, got in per_board.items()}
    mixed = sum(1 for t in tap.texts.values() if len(t) > 1)
    resent = sum(1 for r in ids if tap.sent[r] > 1)
    doc: dict[str, Any] = {
        **when,
        "boards": args.boards, "requests": args.requests, "clients": args.clients, "bundle": bundle,
        "max_tokens": args.max_tokens, "link": net.describe(), "cpu_limit": net.cpu.describe(),
        "shaper": net.shaper, "link_rtt_ms_median_max": rtt, "resend_after_s": args.resend_after_s,
        "boot_s": round(boot_s, 1),
        "elapsed_s": round(elapsed, 1), "events": events,
        "answered_once": once, "lost": len(lost), "lost_errors": dict(clients.errors),
        "duplicated": dup, "wrong_id": clients.wrong_id, "stream": args.stream,
        "stream_mismatch": clients.stream_mismatch if args.stream else None,
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=None)},
        "load_per_board": spread,
        "load_min_max": [min(spread.values()), max(spread.values())],
        "generated_on_two_boards": sum(1 for n in where.values() if n > 1),
        "two_board_ids": {r: sorted(d for d, got in per_board.items() if r in got)
                          for r, n in where.items() if n > 1},
        "slower_than_resend": sum(1 for v in lat if v >= args.resend_after_s),
        "answered_by_no_board_state": sum(1 for r in ids if where[r] == 0),
        "wire": {"request_copies": sum(tap.sent[r] for r in ids), "requests_resent": resent,
                 "finals": sum(tap.finals[r] for r in ids), "ids_with_two_different_texts": mixed},
        "restarts": {b.device: b.kills for b in boards if b.kills},
        "board_log_tail": {b.device: b.logs[-1][-6:] for b in boards if b.kills and b.logs},
    }  # fmt: skip
    p = doc["latency_s"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    md = [
        f"# fleet: {args.boards} boards, {args.requests} requests from {args.clients} SDK clients",
        "",
        f"bundle `{bundle}`, {args.max_tokens} tokens each (greedy, EOS ignored"
        f"{', streamed' if args.stream else ''}); "
        f"links: {doc['link']}; "
        f"{doc['cpu_limit']}; SDK resend after {args.resend_after_s:g} s of silence; "
        f"{doc['elapsed_s']} s of requests (boards booted in {doc['boot_s']} s); {when['date']}; load "
        f"average (1/5/15 min) {when['load_avg_start']} at the start, {when['load_avg_end']} at the end",
        "",
        "| figure | value |",
        "|---|---|",
        f"| answered exactly once (application) | {once} / {args.requests} |",
        f"| lost | {len(lost)} {dict(clients.errors) or ''} |",
        f"| duplicated (a second result, or another id's) | {dup} |",
        *(
            [f"| streamed deltas not adding up to the final text | {clients.stream_mismatch} |"]
            if args.stream
            else []
        ),
        f"| latency p50 / p99 / max (s) | {fmt(p['p50'])} / {fmt(p['p99'])} / {fmt(p['max'])} |",
        f"| requests resent by the SDK (same id) / slower than the resend timer | {resent} / "
        f"{doc['slower_than_resend']} |",
        f"| generated on two boards (wasted work, one result) | {doc['generated_on_two_boards']} |",
        f"| finals with differing texts for one id | {mixed} |",
        f"| board 0 link RTT, TCP connect median / max of 20 (ms) | {' / '.join(map(str, rtt)) or '-'} |",
        f"| namespaces/links/cgroups left after cleanup | {len(net.leftovers())} |",
        "",
        "| board | requests answered | kills |",
        "|---|---|---|",
        *(f"| {b.device} | {spread[b.device]} | {b.kills} |" for b in boards),
        "",
        "| t (s) | done | event |",
        "|---|---|---|",
        *(f"| {e['t_s']} | {e['done']} | {e['event']} |" for e in events),
    ]
    print("\n".join(md))
    doc["_markdown"] = md
    return doc


if __name__ == "__main__":
    main()
