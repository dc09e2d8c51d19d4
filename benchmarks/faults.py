"""The exactly-once trial: N requests from M MQTT clients through broker and server kill -9.

In: a bundle (`--bundle`; default: the tiny random test model, built into a temporary folder,
which needs the `export` extra). Starts a Mosquitto with persistence on (its own folder and free
port, `tests/mosquitto.py`) and `edge-llm serve` with its own `--state` file in the run's folder.
M client threads, each an SDK `MqttClient` (MQTT 5, a fixed client id, a persistent session,
QoS 1), send N requests in all, one after another per client, each with its own request id
(`generate`, `--max-tokens` greedy tokens). During the run the broker is killed with SIGKILL and
restarted on the same port and persistence folder, and later the server is killed with SIGKILL
and restarted on the same state file. The clients only use what the SDK offers (its retries with
the same id after a lost connection or silence).

Out: requests lost (a `generate` that raised, or never returned), finals delivered twice to the
application (a second `Result` for one request id, or a `Result` carrying another request's id),
and finals seen twice on the wire (a separate wire-tap subscriber on every reply topic, with its
own persistent session: the server may legitimately send a stored final again after a client's
resend, and the broker may redeliver to the tap itself after its own restart; both are counted).
Printed and written to `benchmarks/results/faults.{json,md}`.

    python benchmarks/faults.py [--bundle DIR] [--requests 1000] [--clients 20] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import json
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

from mosquitto import Broker  # noqa: E402  (tests/mosquitto.py: a real broker, restartable)

from benchmarks.fuzz_serve import drain, tiny_bundle  # noqa: E402
from benchmarks.results_io import write_results  # noqa: E402
from benchmarks.serve_load import start_server  # noqa: E402

DEVICE = "faults-dev"


class Trial:
    def __init__(self, port: int, requests: int, clients: int, max_tokens: int, timeout: float) -> None:
        self.port, self.requests, self.clients = port, requests, clients
        self.max_tokens, self.timeout = max_tokens, timeout
        self.lock = threading.Lock()
        self.done = 0
        self.results: Counter[str] = Counter()  # request id -> Results the application received
        self.wrong_id = 0
        self.errors: Counter[str] = Counter()
        self.lost: list[str] = []
        self.wire: Counter[str] = Counter()  # request id -> finals seen by the tap
        self.wire_dup_flag = 0

    def client(self, k: int, ids: list[str]) -> None:
        from edge_llm.client import MqttClient

        # A fixed client id + persistent session: the broker keeps this client's subscription and
        # queued replies across its disconnects.
        with MqttClient("127.0.0.1", self.port, device=DEVICE, client_id=f"faults-client-{k}",
                        session_expiry_s=600, timeout=self.timeout) as c:  # fmt: skip
            for rid in ids:
                try:
                    r = c.generate(f"Request {rid}: tell me something.", max_tokens=self.max_tokens,
                                   request_id=rid)  # fmt: skip
                    with self.lock:
                        self.results[r.id] += 1
                        self.wrong_id += r.id != rid
                except Exception as exc:  # a request the application never got an answer to
                    with self.lock:
                        self.lost.append(rid)
                        self.errors[type(exc).__name__] += 1
                with self.lock:
                    self.done += 1

    def tap(self) -> Any:
        """A wire tap on every SDK reply topic, persistent session, QoS 1."""

        def on_message(msg: Any) -> None:
            try:
                reply = json.loads(msg.payload)
            except ValueError:
                return
            if isinstance(reply, dict) and reply.get("done") and isinstance(reply.get("id"), str):
                with self.lock:
                    self.wire[reply["id"]] += 1
                    self.wire_dup_flag += bool(msg.dup)

        return wire_tap("127.0.0.1", self.port, "faults-tap", ["edge-llm/reply/#"], on_message)


def wire_tap(host: str, port: int, client_id: str, topics: list[str], handle: Any) -> Any:
    """A paho MQTT 5 subscriber (persistent session, QoS 1, resubscribes on every connect) that
    calls `handle(msg)` on its network thread for every message on `topics`; started."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def on_connect(c: Any, *_a: Any) -> None:
        c.subscribe([(t, 1) for t in topics])

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, msg: handle(msg)
    c.on_connect = on_connect
    c.reconnect_delay_set(0.2, 2)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    c.connect(host, port, clean_start=False, properties=props)
    c.loop_start()
    return c


def wait_for(pred: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle folder (default: build the tiny test model)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, inside the SDK")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/faults")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-llm-faults-"))
    bundle = args.bundle or str(tiny_bundle(work))
    broker = Broker(work / "broker", persistence=True).start()
    sock = work / "edge.sock"  # the state file is edge.sqlite next to it: this run's own
    mqtt_addr = f"127.0.0.1:{broker.port}"
    server = start_server(bundle, sock, mqtt_addr, DEVICE, threads=1)
    logs = [drain(server)]
    trial = Trial(broker.port, args.requests, args.clients, args.max_tokens, args.timeout)
    tap = trial.tap()
    ids = [f"req-{i}-{uuid.uuid4().hex[:8]}" for i in range(args.requests)]
    threads = [
        threading.Thread(target=trial.client, args=(k, ids[k :: args.clients]), daemon=True)
        for k in range(args.clients)
    ]
    events: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for t in threads:
        t.start()

    def mark(what: str) -> None:
        events.append({"t_s": round(time.monotonic() - t0, 2), "done": trial.done, "event": what})
        print(f"[{events[-1]['t_s']:7.2f} s] {trial.done:5d}/{args.requests} done: {what}", flush=True)

    # Broker kill -9 at ~25% of the requests, server kill -9 at ~60%.
    wait_for(lambda: trial.done >= args.requests // 4, args.timeout)
    broker.stop(kill=True)
    mark("broker killed (SIGKILL)")
    time.sleep(1.0)
    broker.start()
    mark("broker restarted")
    wait_for(lambda: trial.done >= args.requests * 3 // 5, args.timeout)
    server.kill()
    server.wait()
    mark("server killed (SIGKILL)")
    sock.unlink(missing_ok=True)  # start_server waits for a fresh socket file
    time.sleep(1.0)
    server = start_server(bundle, sock, mqtt_addr, DEVICE, threads=1)
    logs.append(drain(server))
    mark("server restarted")
    for t in threads:
        t.join(args.timeout + 60)
    mark("clients finished")
    time.sleep(2.0)  # let the tap see the last finals
    tap.loop_stop()
    tap.disconnect()
    server.terminate()
    server.wait(30)
    broker.stop()
    elapsed = time.monotonic() - t0

    unanswered = [rid for rid in ids if trial.results[rid] == 0]
    doc = {
        "bundle": bundle, "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "elapsed_s": elapsed, "events": events,
        "requests_lost": len(unanswered), "lost_errors": dict(trial.errors),
        "app_duplicates": sum(max(0, n - 1) for n in trial.results.values()), "app_wrong_id": trial.wrong_id,
        "wire_duplicates": sum(max(0, n - 1) for n in trial.wire.values()),
        "wire_duplicate_ids": sum(1 for n in trial.wire.values() if n > 1),
        "wire_dup_flag": trial.wire_dup_flag,
        "wire_finals_missing": sum(1 for r in ids if trial.wire[r] == 0),
        "server_log_tail": [line for log in logs for line in log][-20:],
    }  # fmt: skip
    md = [
        f"# faults: {args.requests} requests from {args.clients} MQTT clients, broker and server kill -9",
        "",
        f"bundle `{bundle}`, {args.max_tokens} tokens each; {elapsed:.0f} s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests lost | {doc['requests_lost']} {doc['lost_errors'] or ''} |",
        f"| finals delivered twice to the application | {doc['app_duplicates']} |",
        f"| results carrying another request's id | {doc['app_wrong_id']} |",
        f"| finals seen twice on the wire (extra copies / ids) | {doc['wire_duplicates']} / "
        f"{doc['wire_duplicate_ids']} |",
        f"| of those, broker redeliveries to the tap (DUP flag) | {doc['wire_dup_flag']} |",
        f"| requests whose final the tap never saw | {doc['wire_finals_missing']} |",
        "",
        "| t (s) | done | event |",
        "|---|---|---|",
        *(f"| {e['t_s']} | {e['done']} | {e['event']} |" for e in events),
    ]
    print("\n".join(md))
    write_results(args.out, doc, md)
    return doc


if __name__ == "__main__":
    main()
