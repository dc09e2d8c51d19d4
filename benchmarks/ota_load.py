"""OTA under load: a bundle update pushed over MQTT to a running `edge-llm serve` while clients
keep sending requests; then bad updates refused, and a slot that fails to start rolled back.

In: a bundle (`--bundle`; default: the tiny random test model, built into a temporary folder,
which needs the `export` extra). Starts a Mosquitto (`tests/mosquitto.py`, its own folder and
free port) and `edge-llm serve` as its own process with `--trusted-key`, its bundle installed as
`PREFIX/bundle` (a plain folder, as install.sh leaves it). Phases:
1. `--clients` SDK clients (`MqttClient`, QoS 1) send requests back to back, each with its own
   id, for `--seconds` before, during and after the update (a renamed, signed copy of the
   bundle) goes in over MQTT (`UpdateSender`, 64 KiB chunks) and is switched to live.
2. While the clients go on: tampered, bad signature, wrong architecture, unmet requirements,
   truncated archive, truncated transfer and failing self-test updates, each of which must be
   refused with its reason, the active bundle unchanged and still answering.
3. The server is stopped, the active slot's graph is damaged on disk (a board whose flash went
   bad after the switch), and `edge-llm serve` is started again with `[ota] failed_starts = 2`:
   two starts fail, the third rolls back to the previous slot and answers.
Out: requests sent / answered exactly once / failed / lost, latency p50 / max around the switch,
the device-reported switch time, each refusal's message, the rollback; printed and written to
`benchmarks/results/ota_load.{json,md}`.

    python benchmarks/ota_load.py [--bundle DIR] [--clients 4] [--seconds 6] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mosquitto import Broker  # noqa: E402  (tests/mosquitto.py: a real broker)
from ota_helpers import bad_updates, make_update  # noqa: E402

from benchmarks.fuzz_serve import drain, tiny_bundle  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402
from edge_llm import ota  # noqa: E402
from edge_llm.errors import UpdateError  # noqa: E402
from edge_llm.ota_send import Connection, UpdateSender  # noqa: E402

DEVICE = "ota-dev"


class Load:
    """Client threads sending requests back to back; what each request id got."""

    def __init__(self, port: int, clients: int, max_tokens: int) -> None:
        self.port, self.clients, self.max_tokens = port, clients, max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent: list[str] = []
        self.finals: Counter[str] = Counter()
        self.errors: dict[str, str] = {}
        self.latency: list[tuple[float, float]] = []  # (sent at, seconds to the final)
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def run(self, k: int) -> None:
        from edge_llm.client import MqttClient

        with MqttClient("127.0.0.1", self.port, device=DEVICE, timeout=120) as c:
            i = 0
            while not self.stop.is_set():
                rid = f"c{k}-{i}"
                i += 1
                with self.lock:
                    self.sent.append(rid)
                t0 = time.monotonic()
                try:
                    r = c.generate(
                        f"Request {rid}: say something.", max_tokens=self.max_tokens, request_id=rid
                    )
                except Exception as exc:  # an error reply or no reply: counted, never hidden
                    with self.lock:
                        self.errors[rid] = f"{type(exc).__name__}: {exc}"
                    continue
                with self.lock:
                    self.finals[r.id] += 1
                    self.latency.append((t0, time.monotonic() - t0))

    def counts(self) -> dict[str, int]:
        with self.lock:
            once = sum(1 for rid in self.sent if self.finals[rid] == 1)
            twice = sum(1 for rid in self.sent if self.finals[rid] > 1)
            failed = len(self.errors)
            lost = sum(1 for rid in self.sent if self.finals[rid] == 0 and rid not in self.errors)
            return {"sent": len(self.sent), "answered_once": once, "answered_twice": twice,
                    "failed": failed, "lost": lost}  # fmt: skip


class Hold:
    """One long request (started now) that holds the old engine while the update is switched."""

    def __init__(self, port: int, tokens: int) -> None:
        self.port, self.tokens, self.result, self.error = port, tokens, None, None
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        time.sleep(1.0)  # admitted before the transfer starts

    def run(self) -> None:
        from edge_llm.client import MqttClient

        try:
            with MqttClient("127.0.0.1", self.port, device=DEVICE, timeout=600) as c:
                self.result = c.generate("Tell a long story.", max_tokens=self.tokens, ignore_eos=True,
                                         request_id="hold")  # fmt: skip
                self.seconds = time.monotonic() - self.t0
        except Exception as exc:  # counted, never hidden
            self.error = f"{type(exc).__name__}: {exc}"

    def report(self, sender: Any, update: Path, prefix: Path, bundle: Path, done: dict[str, Any],
               args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
        self.thread.join(600)
        previous = prefix / "slots" / str(done.get("previous"))
        return {
            "hold_tokens": self.tokens,
            "swap_timeout_s": args.swap_timeout_s,
            "sender_idle_s": args.idle_s,
            "hold_completion_tokens": self.result.usage["completion_tokens"] if self.result else None,
            "hold_seconds": round(self.seconds, 2) if self.result else None,
            "hold_error": self.error,
            "sender_requeried": sender.stats["requeried"],
            "switching_states_seen": sender.stats["switching"],
            "chunks_sent": sender.stats["chunks_sent"],
            "chunks_in_archive": -(-update.stat().st_size // 65536),
            "rollback_slot_keeps_old_bundle": ota.manifest_sha256(previous) == ota.manifest_sha256(bundle),
        }


def serve(prefix: Path, port: int, key: Path, config: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "edge_llm.cli", "serve", "--bundle", str(prefix / "bundle")]
    cmd += ["--mqtt", f"127.0.0.1:{port}", "--device", DEVICE, "--trusted-key", str(key)]
    cmd += ["--state", str(prefix / "state.sqlite"), "--config", str(config), "--threads", "1"]
    return subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)


def wait_serving(proc: subprocess.Popen[str], timeout: float = 120) -> list[str]:
    """stderr lines up to "serving" (raises if the process ended first)."""
    assert proc.stderr is not None
    lines: list[str] = []
    end = time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line.rstrip())
        if "edge-llm: serving" in line:
            return lines
        if time.monotonic() > end:
            break
    raise RuntimeError("edge-llm serve did not start:\n" + "\n".join(lines[-20:]))


def probe(port: int) -> str:
    from edge_llm.client import MqttClient

    with MqttClient("127.0.0.1", port, device=DEVICE, timeout=60) as c:
        return c.generate("Hello", max_tokens=2).text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle folder (default: build the tiny test model)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0, help="load before and after the update")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ota_load")
    slow_help = "a slow switch: one request of this many tokens runs while the update goes in, with"
    slow_help += " [ota] swap_timeout_s = --swap-timeout-s and the sender's idle_s = --idle-s"
    ap.add_argument("--hold-tokens", type=int, default=0, help=slow_help)
    ap.add_argument("--swap-timeout-s", type=float, default=1.0)
    ap.add_argument("--idle-s", type=float, default=2.0)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-llm-ota-load-"))
    bundle = args.bundle or tiny_bundle(work)
    private, public = work / "ota.key", work / "ota.pub"
    ota.keygen(private, public)
    prefix = work / "board"
    prefix.mkdir()
    shutil.copytree(bundle, prefix / "bundle")
    (work / "updates").mkdir()
    update = make_update(bundle, work / "updates", private, "update-v2")
    bad = bad_updates(bundle, work / "updates", (private, public))
    fresh = make_update(bundle, work / "updates", private, "update-v3")
    config = work / "board.toml"
    slow = f"swap_timeout_s = {args.swap_timeout_s}\n" if args.hold_tokens else ""
    config.write_text(f"[ota]\nfailed_starts = 2\n{slow}")
    broker = Broker(work / "broker").start()
    doc: dict[str, Any] = {"device": DEVICE, "clients": args.clients, "max_tokens": args.max_tokens,
                           "update_bytes": update.stat().st_size, "bundle": str(bundle),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "load_avg_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    proc = serve(prefix, broker.port, public, config)
    logs: list[str] = []
    try:
        logs += wait_serving(proc)
        logs = drain(proc)
        load = Load(broker.port, args.clients, args.max_tokens)
        load.start()
        time.sleep(args.seconds)
        conn = Connection("127.0.0.1", broker.port)
        hold = Hold(broker.port, args.hold_tokens) if args.hold_tokens else None
        with UpdateSender(conn, timeout=600, idle_s=args.idle_s if hold else 20.0) as sender:
            t0 = time.monotonic()
            done = sender.send(DEVICE, update, chunk_size=64 * 1024)
            t1 = time.monotonic()
            if hold is not None:
                doc["slow_switch"] = hold.report(sender, update, prefix, bundle, done, args)
            chunks = sender.stats["chunks_sent"]
            time.sleep(args.seconds)
            phase1 = load.counts()
            # A snapshot while the clients still run: what is unanswered is in flight, not lost
            # (the final counts, after `finish`, say what was lost).
            phase1["in_flight"] = phase1.pop("lost")
            around = [s for at, s in load.latency if t0 - 2 <= at <= t1 + 2]
            before = [s for at, s in load.latency if at < t0 - 2]
            doc["update"] = {"transfer_and_switch_s": round(t1 - t0, 3), "chunks": chunks,
                             "device_switch_s": done.get("switch_s"), "slot": done.get("slot"),
                             "bundle": done.get("bundle"), "sha256": done.get("sha256")}  # fmt: skip
            doc["latency_s"] = {
                "before_p50": round(statistics.median(before), 4) if before else None,
                "around_switch_p50": round(statistics.median(around), 4) if around else None,
                "around_switch_max": round(max(around), 4) if around else None,
            }
            refusals: dict[str, Any] = {}
            # Not `update`: the device serves it now and answers its `begin` with `done` at once.
            cases = {**bad, "truncated transfer": (fresh, "truncated transfer")}
            for name, (archive, _words) in cases.items():
                kw = {"max_chunks": 1, "chunk_size": 4096} if name == "truncated transfer" else {}
                try:
                    state = sender.send(DEVICE, archive, **kw)
                    refusals[name] = {"refused": False, "state": state}
                except UpdateError as exc:
                    refusals[name] = {"refused": True, "error": str(exc)}
                status = sender.wait_status(DEVICE, lambda s: True, 10) or {}
                refusals[name]["serving_after"] = (status.get("bundle") or {}).get("name")
                refusals[name]["answers_after"] = bool(probe(broker.port))
            doc["refusals"] = refusals
        load.finish()
        doc["requests"] = load.counts()
        doc["requests_during_update_phase"] = phase1
        doc["errors_sample"] = dict(list(load.errors.items())[:5])
        proc.terminate()
        proc.wait(60)
        doc["rollback"] = rollback_phase(prefix, broker.port, public, config)
        doc["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()
    report(args, doc)
    shutil.rmtree(work, ignore_errors=True)
    return doc


def rollback_phase(prefix: Path, port: int, key: Path, config: Path) -> dict[str, Any]:
    """Damage the active slot on disk; start the service until it rolls back (at most 4 starts)."""
    slots = ota.Slots(prefix)
    damaged = slots.active()
    graph = slots.root / str(damaged) / "model.onnx"
    graph.write_bytes(b"damaged on flash")
    starts: list[dict[str, Any]] = []
    for _ in range(4):
        t0 = time.monotonic()
        proc = serve(prefix, port, key, config)
        try:
            lines = wait_serving(proc, 180)
        except RuntimeError as exc:
            proc.wait(30)
            said = [ln for ln in str(exc).splitlines() if "update:" in ln or "error" in ln.lower()]
            starts.append({"ok": False, "s": round(time.monotonic() - t0, 2), "said": said[-2:]})
            continue
        said = [ln for ln in lines if "update:" in ln]
        answer = probe(port)
        starts.append(
            {"ok": True, "s": round(time.monotonic() - t0, 2), "said": said, "answers": bool(answer)}
        )
        proc.terminate()
        proc.wait(60)
        break
    return {"damaged_slot": damaged, "active_after": slots.active(), "starts": starts,
            "last_update": ota.last_outcome(prefix / "state.ota")}  # fmt: skip


def report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    r, u, lat = doc["requests"], doc["update"], doc["latency_s"]
    lines = [
        "# OTA under load",
        "",
        f"`python benchmarks/ota_load.py --clients {args.clients} --seconds {args.seconds:g} "
        f"--max-tokens {args.max_tokens}{' --bundle B' if args.bundle else ''}"
        f"{f' --hold-tokens {args.hold_tokens}' if args.hold_tokens else ''}` ({doc['bundle']};"
        f" {doc['date']}; 2 shared cores, load average"
        f" (1/5/15 min) {doc['load_avg_start']} at the start, {doc['load_avg_end']} at the end)",
        "",
        "| requests sent | answered exactly once | answered twice | failed | lost |",
        "|---|---|---|---|---|",
        f"| {r['sent']} | {r['answered_once']} | {r['answered_twice']} | {r['failed']} | {r['lost']} |",
        "",
        f"Valid update ({doc['update_bytes']} bytes, {u['chunks']} chunks of 64 KiB): sent, checked, "
        f"self-tested and switched in {u['transfer_and_switch_s']} s; the engine swap itself (waiting for "
        f"the running requests) {u['device_switch_s']} s; now slot {u['slot']}, {u['bundle']}.",
        f"Request latency p50 before: {lat['before_p50']} s; around the switch: p50 "
        f"{lat['around_switch_p50']} s, max {lat['around_switch_max']} s.",
        "",
        "| bad update | refused | serving after | answers after | device's reason |",
        "|---|---|---|---|---|",
    ]
    for name, x in doc["refusals"].items():
        reason = str(x.get("error", x.get("state")))[:140].replace("|", "/")
        lines.append(f"| {name} | {x['refused']} | {x['serving_after']} | {x['answers_after']} | {reason} |")
    sw = doc.get("slow_switch")
    if sw:
        lines += [
            "",
            f"Slow switch: a {sw['hold_tokens']}-token request held the old engine ({sw['hold_seconds']} s,"
            f" {sw['hold_completion_tokens']} tokens, error {sw['hold_error']});"
            f" `swap_timeout_s = {sw['swap_timeout_s']:g}`, sender idle {sw['sender_idle_s']:g} s: the"
            f" sender asked again {sw['sender_requeried']} times and heard `switching`"
            f" {sw['switching_states_seen']} times; chunks sent {sw['chunks_sent']} of"
            f" {sw['chunks_in_archive']} in the archive; the rollback slot keeps the old bundle:"
            f" {sw['rollback_slot_keeps_old_bundle']}.",
        ]
    rb = doc["rollback"]
    lines += ["", f"Rollback: slot {rb['damaged_slot']} damaged on disk, `[ota] failed_starts = 2`:"]
    for i, s in enumerate(rb["starts"], 1):
        lines.append(
            f"- start {i}: {'serving' if s['ok'] else 'failed'} after {s['s']} s; {'; '.join(s['said'])}"
        )
    lines.append(f"- active slot after: {rb['active_after']}")
    print("\n".join(lines))
    write_results(args.out, doc, lines)


if __name__ == "__main__":
    main()
