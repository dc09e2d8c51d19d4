"""Hostile traffic against a real `edge-llm serve`: every message must get exactly one final.

In: a bundle (`--bundle`; default: the tiny random test model, exported into a temporary folder,
which needs the `export` extra). Starts a private `mosquitto` on a free port and `edge-llm serve`
with a Unix socket and MQTT, then sends `--count` generated hostile messages over each transport
(families: malformed JSON, deep nesting, overflowing numbers, NaN/Infinity, lone surrogates, wrong
types, huge strings up to the payload limit, bad `reply_to`). Over the socket every message goes
on one connection; over MQTT 5 each carries a Response Topic and its own Correlation Data, so a
final with `"id": null` is still matched to the message that caused it.

Out, per transport and family: messages sent, finals by code, missing finals (a message with a
readable id or a reply address that got none), duplicate finals, finals whose code is not the
documented one (`bad_request`; `too_long`/`busy` allowed where a message is a valid request);
server alive, server RSS before/after, and whether a valid request is answered afterwards on both
transports. For `reply_to` over MQTT (no Response Topic, so the device must not reply anywhere
it is told): replies seen on topics a client named (a wire tap on `#`) and device reconnects
(its retained `online` status re-published). Printed and written to
`benchmarks/results/fuzz_serve.{json,md}`.

    python benchmarks/fuzz_serve.py [--bundle DIR] [--count 10000] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import write_results  # noqa: E402
from benchmarks.serve_load import start_broker, start_server  # noqa: E402

MAX_PAYLOAD = 64 * 1024  # the server's default [server] max_payload
DEVICE = "fuzz-dev"
REPLY_TOPIC = "fuzz/replies"


@dataclass
class Case:
    family: str
    payload: bytes
    rid: str | None  # the id the final must carry (None: unreadable, the final has "id": null)
    codes: frozenset[str]  # documented codes for this message
    reply_to: str | None = None  # MQTT: a hostile reply_to with no Response Topic


BAD = frozenset({"bad_request"})
VALID = frozenset({"bad_request", "too_long", "busy"})  # a request that may be valid as sent


def _valid(rid: str) -> dict[str, Any]:
    return {"id": rid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode()  # lone surrogates become \udXXX escapes


def _malformed(r: random.Random, rid: str) -> Case:
    text = _dump(_valid(rid))
    kind = r.randrange(5)
    if kind == 0:
        payload = text[: r.randrange(1, len(text) - 1)]  # truncated
    elif kind == 1:
        payload = bytes(r.randrange(256) for _ in range(r.randrange(1, 200))).replace(b"\n", b" ")
    elif kind == 2:
        payload = text.replace(b'"hi"', b'"h\xff\xfei"')  # not UTF-8
    elif kind == 3:
        payload = r.choice([b"[]", b"42", b'"str"', b"null", b"true", b"{}", b"{,}", b'{"id":}'])
    else:
        payload = text + b" trailing"
    return Case("malformed_json", payload.strip() or b"{", None, BAD)


def _deep(r: random.Random, rid: str) -> Case:
    depth = r.choice([33, 100, 999, 1000, 5000, 30000])
    opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    if len(inner) + 40 > MAX_PAYLOAD:
        inner = opener * depth  # unbalanced, still deep (and within the limit)
        inner = inner[: MAX_PAYLOAD - 40]
    return Case("deep_nesting", b'{"id":"' + rid.encode() + b'","x":' + inner + b"}", None, BAD)


def _overflow(r: random.Random, rid: str) -> Case:
    field = r.choice(["temperature", "top_p", "repetition_penalty", "deadline_ms", "max_tokens", "seed",
                      "top_k"])  # fmt: skip
    digits = r.choice([20, 309, 312, 400, 4301, 20000])
    number = ("-" if r.random() < 0.3 else "") + "9" * digits
    text = _dump(_valid(rid))[:-1] + f',"{field}":{number}}}'.encode()
    return Case("overflow_numbers", text, rid, BAD)


def _non_finite(r: random.Random, rid: str) -> Case:
    field = r.choice(["temperature", "top_p", "repetition_penalty", "deadline_ms", "seed", "max_tokens"])
    value = r.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
    return Case("non_finite", _dump(_valid(rid))[:-1] + f',"{field}":{value}}}'.encode(), rid, BAD)


def _surrogate(r: random.Random, rid: str) -> Case:
    s = chr(r.randrange(0xD800, 0xE000))
    msg = _valid(rid)
    where = r.randrange(7)
    if where == 0:
        return Case("surrogates", _dump({**msg, "id": rid[:4] + s}), None, BAD)
    if where == 1:
        msg = {"id": rid, "prompt": "a" + s}
    elif where == 2:
        msg["messages"] = [{"role": "user", "content": s + "b"}]
    elif where == 3:
        msg["session"] = "s" + s
    elif where == 4:
        msg[s + "field"] = 1
    elif where == 5:
        msg["x"] = {"nested": [{s: "v"}]}
    else:
        msg["stop"] = [s]
    return Case("surrogates", _dump(msg), rid, BAD)


_WRONG = [None, True, "8", 1.5, -1, 0, [], {}, [1, 2], {"a": 1}, "", "x" * 200]


def _wrong_type(r: random.Random, rid: str) -> Case:
    msg = _valid(rid)
    field = r.choice(["messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                      "stream", "session", "deadline_ms", "repetition_penalty", "ignore_eos", "prompt",
                      "role"])  # fmt: skip
    value = r.choice(_WRONG)
    if field == "role":
        msg["messages"] = [{"role": value, "content": "x"}]
    elif field == "prompt":
        msg["prompt"] = value  # with messages too: never valid
    else:
        msg[field] = value
    return Case("wrong_types", _dump(msg), rid, BAD)


def _huge(r: random.Random, rid: str) -> Case:
    kind = r.randrange(3)
    if kind == 0:  # just under the limit, invalid because of an unknown field
        size = MAX_PAYLOAD - 200 - r.randrange(1000)
        return Case("huge_strings", _dump({**_valid(rid), "blob": "x" * size}), rid, BAD)
    if kind == 1:  # over the limit: refused before parsing, so the id is unreadable
        return Case("huge_strings", _dump({**_valid(rid), "prompt": "y" * (MAX_PAYLOAD + 10)}), None, BAD)
    stops = ["z" * 6000] * 9  # nine stop strings: one too many
    return Case("huge_strings", _dump({**_valid(rid), "stop": stops}), rid, BAD)


def _reply_to(r: random.Random, rid: str) -> Case:
    target = r.choice([
        "x\u0001y", "a\u001fb", "c\u007fd", "e\u0085f", "edge-llm/other/generate", "edge-llm/other/status",
        f"edge-llm/{DEVICE}/status", f"edge-llm/{DEVICE}/cancel", "$SYS/broker/x", "$share/g/t", "a/+/b",
        "a/#", "edge-llm/reply/someone-else", "t" * 60000, "nul\u0000byte",
    ])  # fmt: skip
    return Case("bad_reply_to", _dump({**_valid(rid), "reply_to": target}), rid, BAD, reply_to=target)


FAMILIES: list[Callable[[random.Random, str], Case]] = [
    _malformed, _deep, _overflow, _non_finite, _surrogate, _wrong_type, _huge, _reply_to,
]  # fmt: skip


def generate(count: int, seed: int, prefix: str) -> list[Case]:
    """`count` cases, the families in turn; bad_reply_to last (it may disconnect the device).

    A generated message the parser accepts (e.g. `"temperature": 1.5` among the wrong types, or
    any bad_reply_to: the parser leaves topic rules to the transport) is a valid request: it may
    also end `ok`, `too_long` or `busy`."""
    from edge_llm.protocol import ProtocolError, parse_message

    r = random.Random(seed)
    cases = [FAMILIES[i % len(FAMILIES)](r, f"{prefix}{i}") for i in range(count)]
    for case in cases:
        try:
            parse_message(case.payload, MAX_PAYLOAD)
            case.codes = VALID
        except ProtocolError:
            pass
    # Control characters last of all: before the harden-mqtt fix they knock the device off MQTT.
    return sorted(cases, key=lambda c: (c.family == "bad_reply_to", _has_control(c.reply_to or "")))


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in text)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tally:
    """Finals received per message index, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finals: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.orphans: list[dict[str, Any]] = []  # finals not matched to a message
        self.arrived = threading.Condition(self.lock)

    def add(self, index: int | None, reply: dict[str, Any]) -> None:
        with self.arrived:
            (self.finals[index] if index is not None else self.orphans).append(reply)
            self.arrived.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        with self.arrived:
            return self.arrived.wait_for(pred, timeout)


def summarise(cases: list[Case], tally: Tally, expect: Callable[[Case], bool]) -> dict[str, Any]:
    """Per family: sent, finals by code, missing, duplicates, undocumented codes."""
    fam: dict[str, Counter[str]] = defaultdict(Counter)
    for i, case in enumerate(cases):
        f = fam[case.family]
        f["sent"] += 1
        got = tally.finals.get(i, [])
        for reply in got:
            code = reply["error"]["code"] if "error" in reply else "ok"
            f[f"code:{code}"] += 1
            if code not in case.codes and not (code == "ok" and case.codes is VALID):
                f["undocumented"] += 1
            if reply.get("id") != case.rid and "error" in reply:
                f["wrong_id"] += 1
        if expect(case):
            f["missing"] += len(got) == 0
            f["duplicates"] += max(0, len(got) - 1)
    out = {name: dict(c) for name, c in fam.items()}
    total = Counter()
    for c in fam.values():
        total.update({k: v for k, v in c.items() if not k.startswith("code:")})
    return {"families": out, "total": dict(total), "orphan_finals": len(tally.orphans)}


def fuzz_socket(path: Path, cases: list[Case]) -> dict[str, Any]:
    import socket as socketlib

    tally = Tally()
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.connect(str(path))
    index_of = {c.rid: i for i, c in enumerate(cases) if c.rid is not None}
    null_order = [i for i, c in enumerate(cases) if c.rid is None]  # null-id finals come in order
    nulls = iter(null_order)

    def reader() -> None:
        for line in sock.makefile("rb"):
            reply = json.loads(line)
            if reply.get("done"):
                rid = reply.get("id")
                tally.add(index_of.get(rid) if rid is not None else next(nulls, None), reply)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i, case in enumerate(cases):
        sock.sendall(case.payload + b"\n")
        if case.codes is VALID:
            # A request that may be valid goes to the queue: wait for it so `busy` stays rare.
            tally.wait(lambda i=i: i in tally.finals, 30)
    tally.wait(lambda: len(tally.finals) + len(tally.orphans) >= len(cases), 60)
    sock.close()
    return summarise(cases, tally, lambda c: True)


def fuzz_mqtt(port: int, cases: list[Case]) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    tally = Tally()
    hostile_topics: Counter[str] = Counter()
    online = Counter()
    hostile_set = {c.reply_to for c in cases if c.reply_to}

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        if c is tap:
            if msg.topic == f"edge-llm/{DEVICE}/status" and b'"online"' in msg.payload:
                online["online"] += 1
            elif msg.topic in hostile_set:
                hostile_topics[msg.topic] += 1
            return
        reply = json.loads(msg.payload)
        if not reply.get("done"):
            return
        corr = getattr(msg.properties, "CorrelationData", None)
        tally.add(int(corr) if corr else None, reply)

    def client(name: str, topics: list[tuple[str, int]]) -> Any:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-{name}-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)  # fmt: skip
        c.on_message = on_message
        c.max_inflight_messages_set(200)
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(topics)
        return c

    # Two clients: one subscription each, so no message is delivered twice by overlapping filters.
    tap = client("tap", [("#", 0)])
    c = client("sender", [(REPLY_TOPIC, 1)])
    time.sleep(0.5)
    online_before = online["online"]
    topic = f"edge-llm/{DEVICE}/generate"
    for i, case in enumerate(cases):
        props = None
        if case.reply_to is None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = REPLY_TOPIC
            props.CorrelationData = str(i).encode()
        c.publish(topic, case.payload, qos=1, properties=props).wait_for_publish(30)
        if case.reply_to is not None:
            time.sleep(0.01)  # no reply to wait for: pace them instead
        elif case.codes is VALID:  # queued for generation: wait, so `busy` stays rare
            tally.wait(lambda i=i: i in tally.finals, 30)
        elif i % 100 == 99:  # keep the device's inbound queue bounded
            tally.wait(lambda i=i: sum(1 for k in tally.finals if k > i - 50) > 0, 30)
    replyable = sum(1 for cs in cases if cs.reply_to is None)
    tally.wait(lambda: len(tally.finals) >= replyable, 60)
    time.sleep(2)
    for each in (c, tap):
        each.loop_stop()
        each.disconnect()
    out = summarise(cases, tally, lambda cs: cs.reply_to is None)
    out["replies_on_hostile_topics"] = sum(hostile_topics.values())
    out["hostile_topics_replied"] = sorted(repr(t)[:60] for t in hostile_topics)
    out["device_reconnects"] = max(0, online["online"] - online_before)
    return out


def drain(proc: Any) -> list[str]:
    """Read a child's stderr on a thread (a full pipe would block it); keep the lines."""
    lines: list[str] = []

    def run() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())

    threading.Thread(target=run, daemon=True).start()
    return lines


def check_valid(sock: Path, port: int) -> dict[str, bool | str]:
    from edge_llm.client import MqttClient, SocketClient

    out: dict[str, bool | str] = {}
    for name, make in (
        ("socket", lambda: SocketClient(str(sock), timeout=30)),
        ("mqtt", lambda: MqttClient("127.0.0.1", port, device=DEVICE, timeout=30)),
    ):
        try:
            with make() as client:
                out[name] = bool(client.generate("Hello", max_tokens=2).text is not None)
        except Exception as exc:  # report, do not crash the benchmark
            out[name] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def tiny_bundle(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_hf, export_bundle  # the test suite's tiny random model

    return export_bundle(build_tiny_hf(folder / "hf"), folder / "bundle", "none")


def _row(transport: str, family: str, c: dict[str, int], last: str) -> str:
    cells = [c.get(k, 0) for k in ("sent", "missing", "duplicates", "undocumented", "wrong_id")]
    return f"| {transport} | {family} | " + " | ".join(map(str, cells)) + f" | {last} |"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle folder (default: build the tiny test model)")
    ap.add_argument("--count", type=int, default=10_000, help="hostile messages per transport")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fuzz_serve")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-llm-fuzz-"))
    bundle = args.bundle or str(tiny_bundle(work))
    broker, port = start_broker(work, nodelay=True)
    sock = work / "edge.sock"
    server = start_server(bundle, sock, f"127.0.0.1:{port}", DEVICE, threads=1)
    logs = {"server": drain(server), "broker": drain(broker)}
    try:
        warm = check_valid(sock, port)
        rss_before = rss_mb(server.pid)
        t0 = time.monotonic()
        results = {"socket": fuzz_socket(sock, generate(args.count, args.seed, "s"))}
        results["mqtt"] = fuzz_mqtt(port, generate(args.count, args.seed + 1, "m"))
        elapsed = time.monotonic() - t0
        alive = server.poll() is None
        rss_after = rss_mb(server.pid) if alive else float("nan")
        after = check_valid(sock, port) if alive else {"socket": "server dead", "mqtt": "server dead"}
    finally:
        server.terminate()
        server.wait(30)
        broker.terminate()
        broker.wait(10)
    doc = {
        "bundle": bundle, "count_per_transport": args.count, "seed": args.seed, "elapsed_s": elapsed,
        "server_alive": alive, "rss_mb_before": rss_before, "rss_mb_after": rss_after,
        "valid_before": warm, "valid_after": after, "transports": results,
        "server_log_lines": len(logs["server"]), "server_log_tail": logs["server"][-20:],
        "server_log_disconnects": sum("disconnected" in x for x in logs["server"]),
    }  # fmt: skip
    md = [
        f"# fuzz_serve: {args.count} hostile messages per transport (seed {args.seed})", "",
        f"bundle `{bundle}`; server alive after: **{alive}**; RSS {rss_before:.0f} → {rss_after:.0f} MB; "
        f"valid request after: {after}; {elapsed:.0f} s", "",
        "| transport | family | sent | missing | duplicates | undocumented | wrong id | finals by code |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, res in results.items():
        for fam, c in sorted(res["families"].items()):
            codes = ", ".join(f"{k[5:]} {v}" for k, v in sorted(c.items()) if k.startswith("code:"))
            md.append(_row(name, fam, c, codes))
        md.append(_row(name, "**all**", res["total"], f"orphans {res['orphan_finals']}"))
    m = results["mqtt"]
    md += ["", f"MQTT bad_reply_to (no Response Topic): replies published on client-named topics: "
           f"{m['replies_on_hostile_topics']} ({', '.join(m['hostile_topics_replied']) or 'none'}); "
           f"device reconnects during the run: {m['device_reconnects']}"]  # fmt: skip
    print("\n".join(md))
    write_results(args.out, doc, md)
    return doc


if __name__ == "__main__":
    main()
