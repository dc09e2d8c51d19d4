"""Metrics: Prometheus text from a real server on the tiny bundle, and the MQTT heartbeat."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from edge_llm.board import BoardConfig, MetricsConfig, MqttConfig, ServerConfig, SocketConfig
from edge_llm.engine import Engine
from edge_llm.metrics import Metrics, cache_bytes
from edge_llm.server import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from mosquitto import Broker, free_port
from mqtt_helpers import Raw, client

HELLO = [{"role": "user", "content": "hello"}]


class Line:
    """JSON lines over the server's Unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        return json.loads(self.file.readline())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


@pytest.fixture
def served(tiny_fused: Path, tmp_path: Path) -> Iterator[tuple[Server, int]]:
    port = free_port()
    board = BoardConfig(
        socket=SocketConfig(path=str(tmp_path / "edge.sock")),
        server=ServerConfig(max_payload=4096),
        metrics=MetricsConfig(listen=f"127.0.0.1:{port}"),
    )
    s = Server(Engine.load(tiny_fused), board, state_path=tmp_path / "state.sqlite")
    s.start()
    yield s, port
    s.stop()


def test_metrics_parse_and_move_after_requests(served: tuple[Server, int]) -> None:
    server, port = served
    before = samples(scrape(port))
    assert before[("edge_llm_queue_depth", ())] == 0
    assert before[("edge_llm_in_flight", ())] == 0
    info = [k for k in before if k[0] == "edge_llm_server_info"]
    assert info and dict(info[0][1])["provider"] == "CPUExecutionProvider"
    assert ("edge_llm_requests_total", (("outcome", "completed"), ("transport", "socket"))) not in before

    line = Line(str(server.socket.path))
    try:
        for i in range(3):
            line.send({"id": f"m{i}", "messages": HELLO, "max_tokens": 5, "ignore_eos": True, "stream": True})
            while not line.recv().get("done"):
                pass
        line.send({"id": "s1", "messages": HELLO, "max_tokens": 3, "session": "conv"})
        assert "text" in line.recv()
        line.send({"id": "s2", "messages": HELLO, "max_tokens": 3, "session": "conv"})
        assert "text" in line.recv()
        line.send({"id": "bad", "messages": HELLO, "max_tokens": "many"})
        assert line.recv()["error"]["code"] == "bad_request"
        line.send({"id": "m0", "messages": HELLO, "max_tokens": 5, "ignore_eos": True})  # a replay
        assert line.recv()["text"]
    finally:
        line.close()

    after = samples(scrape(port))
    done = ("edge_llm_requests_total", (("outcome", "completed"), ("transport", "socket")))
    assert after[done] == 6  # 3 + 2 session turns + the replayed final
    assert after[("edge_llm_requests_total", (("outcome", "bad_request"), ("transport", "socket")))] == 1
    # Tokens: the replay is not counted again (3 × 5 + 2 × 3 at most; ignore_eos makes 3 × 5 exact).
    out = after[("edge_llm_tokens_total", (("kind", "completion"),))]
    assert 15 < out <= 21
    assert after[("edge_llm_tokens_total", (("kind", "prompt"),))] > 0
    assert after[("edge_llm_request_duration_seconds_count", (("transport", "socket"),))] == 7
    assert after[("edge_llm_queue_wait_seconds_count", ())] == 5
    assert after[("edge_llm_time_to_first_token_seconds_count", ())] == 5
    assert after[("edge_llm_decode_tokens_per_second_count", ())] >= 3
    assert after[("edge_llm_session_cache_total", (("result", "miss"),))] == 1
    assert after[("edge_llm_session_cache_total", (("result", "hit"),))] == 1  # the second turn's KV
    assert after[("edge_llm_batch_occupancy_rows_count", ())] > 0
    # The batch buffer is reserved whole; the live session's slot holds its positions.
    reserved = after[("edge_llm_kv_cache_bytes", (("kind", "reserved"),))]
    used = after[("edge_llm_kv_cache_bytes", (("kind", "used"),))]
    assert reserved > used > 0
    assert after[("edge_llm_in_flight", ())] == 0


def test_render_is_the_same_text_for_another_transport(served: tuple[Server, int]) -> None:
    server, _ = served
    body, content_type = server.metrics.render()
    assert content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"edge_llm_requests", "edge_llm_request_duration_seconds", "edge_llm_kv_cache_bytes"} <= names


def test_each_server_has_its_own_registry(tiny_bundle: Path) -> None:
    engine = Engine.load(tiny_bundle)
    from edge_llm.scheduler import Scheduler

    a, b = (Metrics(Scheduler(engine), engine, prometheus=True) for _ in range(2))
    from edge_llm.protocol import Event

    a.finished("socket", Event("error", "x", code="busy"), 0.01)
    key = ("edge_llm_requests_total", (("outcome", "busy"), ("transport", "socket")))
    assert samples(a.render()[0].decode())[key] == 1
    assert key not in samples(b.render()[0].decode())


def test_cache_bytes_of_a_concat_cache(tiny_bundle: Path) -> None:
    """The concat layout's KV is ORT values: its size follows from shape and element type."""
    engine = Engine.load(tiny_bundle)
    from edge_llm.engine import Slot

    slot = Slot()
    engine.prefill(engine.encode_request(prompt="hello there"), slot)
    arch = engine.bundle.architecture
    expected = 2 * arch.num_layers * arch.num_kv_heads * len(slot.ids) * arch.head_dim * 4
    assert cache_bytes(slot.cache) == (expected, expected)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path) -> None:
    import builtins

    from edge_llm.errors import ConfigError
    from edge_llm.scheduler import Scheduler

    real = builtins.__import__

    def fake(name: str, *a: Any, **k: Any) -> Any:
        if name == "prometheus_client":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    engine = Engine.load(tiny_bundle)
    with pytest.raises(ConfigError, match=r"edge-llm\[metrics\]"):
        Metrics(Scheduler(engine), engine, prometheus=True)
    plain = Metrics(Scheduler(engine), engine)  # the heartbeat's tallies need no extra
    assert plain.summary()["requests"] == 0


def test_mqtt_heartbeat_is_retained_and_parses(tiny_bundle: Path, tmp_path: Path) -> None:
    with Broker(tmp_path / "broker") as broker:
        cfg = MqttConfig(host=broker.host, port=broker.port, device="hb1", metrics_interval_s=0.2)
        s = Server(Engine.load(tiny_bundle), BoardConfig(mqtt=cfg), state_path=tmp_path / "s.sqlite")
        s.start()
        try:
            with client(broker, device="hb1") as c:
                assert c.generate(messages=HELLO, max_tokens=4, ignore_eos=True).text
            # A subscriber that comes later gets the latest summary at once: it is retained.
            summary: dict[str, Any] = {}
            for _ in range(50):
                raw = Raw(broker)
                try:
                    raw.subscribe("edge-llm/hb1/metrics")
                    summary, msg = raw.get(10)
                finally:
                    raw.close()
                if msg.retain and summary["requests"] == 1:  # a retained one from after the request
                    break
                time.sleep(0.2)
        finally:
            s.stop()
    assert msg.retain and s.mqtt.stats["heartbeats"] >= 1
    assert summary["device"] == "hb1"
    assert summary["requests"] == 1 and summary["errors"] == 0
    assert summary["outcomes"] == {"completed": 1}
    assert summary["tokens_out"] == 4
    assert summary["in_flight"] == 0 and summary["queue_depth"] == 0
    assert summary["provider"] == "CPUExecutionProvider"
    assert summary["kv_reserved_bytes"] >= summary["kv_bytes"] >= 0 and summary["uptime_s"] > 0


def test_grafana_dashboard_uses_only_metrics_we_export(served: tuple[Server, Any]) -> None:
    server, _ = served
    path = Path(__file__).resolve().parents[2] / "configs/grafana/edge-llm.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"edge_llm_[a-z_]+", e)}
    families = list(text_string_to_metric_families(server.metrics.render()[0].decode()))
    # A labelled family has no samples until its first observation: match by family name too.
    exported = {s.name for f in families for s in f.samples} | {f.name for f in families}
    base = {n: re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    missing = {n for n in used if n not in exported and base[n] not in exported}
    assert not missing
    titles = {p["title"] for p in dashboard["panels"]}
    assert any("QPS" in t for t in titles) and any("latency" in t.lower() for t in titles)
