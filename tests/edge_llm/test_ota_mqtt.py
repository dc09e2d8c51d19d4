"""Bundle updates over MQTT to a running server: live switch under load, refusals, resuming,
status, rollback after failed starts, canary rollout. A real mosquitto, tiny bundles."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cryptography")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from mosquitto import Broker
from mqtt_helpers import HELLO, Raw, broker, client
from ota_helpers import bad_updates, make_update

from edge_llm import ota
from edge_llm.board import BoardConfig, MqttConfig, OtaConfig, ServerConfig
from edge_llm.bundle import load_bundle
from edge_llm.engine import Engine
from edge_llm.errors import UpdateError
from edge_llm.ota_send import Connection, UpdateSender, rollout
from edge_llm.server import Server
from tests.conftest import gate_method

__all__ = ["broker"]  # the shared fixture (tests/mqtt_helpers.py), used by name

DEVICE = "ota1"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "ota.key", tmp_path / "ota.pub"
    ota.keygen(private, public)
    return private, public


def device_prefix(tiny_bundle: Path, folder: Path) -> Path:
    """A board as install.sh leaves it: PREFIX/bundle is a plain folder."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_bundle, folder / "bundle")
    return folder


def start_device(prefix: Path, broker: Broker, public: Path, device: str = DEVICE, **ota_kw: Any) -> Server:
    cfg = MqttConfig(
        host=broker.host, port=broker.port, device=device, reconnect_min_s=0.1, reconnect_max_s=0.5
    )
    board = BoardConfig(
        mqtt=cfg,
        server=ServerConfig(max_queue=64, max_inflight_per_client=64),
        ota=OtaConfig(trusted_key=str(public), **ota_kw),
    )
    server = Server(Engine.load(prefix / "bundle"), board, state_path=prefix / "state.sqlite")
    server.start()
    return server


def held_request(broker: Broker) -> tuple[threading.Thread, dict[str, Any]]:
    """A 4-token request (id "held") on its own thread, not started; its final lands in the dict
    under "r". The caller holds the engine's steps to keep it running across a switch."""
    result: dict[str, Any] = {}

    def run() -> None:
        with client(broker, device=DEVICE, timeout=120) as c:
            result["r"] = c.generate(messages=HELLO, max_tokens=4, ignore_eos=True, request_id="held")

    return threading.Thread(target=run), result


def sender(broker: Broker, **kw: Any) -> UpdateSender:
    return UpdateSender(Connection(broker.host, broker.port), timeout=kw.pop("timeout", 120), **kw)


def retained_status(broker: Broker, device: str = DEVICE) -> dict[str, Any]:
    raw = Raw(broker)
    raw.subscribe(f"edge-llm/{device}/status")
    payload, _ = raw.get(10)
    raw.close()
    return payload


def answers(broker: Broker, device: str = DEVICE) -> bool:
    with client(broker, device=device) as c:
        return bool(c.generate(messages=HELLO, max_tokens=2).usage["completion_tokens"] == 2)


def test_an_update_over_mqtt_switches_the_running_server_and_loses_no_request(
    tiny_bundle: Path, tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    prefix = device_prefix(tiny_bundle, tmp_path / "board")
    server = start_device(prefix, broker, keys[1])
    update = make_update(tiny_bundle, tmp_path, keys[0])
    old_sha = ota.manifest_sha256(tiny_bundle)
    stop = threading.Event()
    finals: Counter[str] = Counter()
    errors: list[str] = []
    sent: list[str] = []

    def load(k: int) -> None:  # requests without pause while the update goes in and switches
        with client(broker, device=DEVICE) as c:
            i = 0
            while not stop.is_set():
                rid = f"c{k}-{i}"
                sent.append(rid)
                try:
                    r = c.generate(messages=HELLO, max_tokens=6, ignore_eos=True, request_id=rid)
                    finals[r.id] += 1
                except Exception as exc:
                    errors.append(f"{rid}: {exc}")
                i += 1

    try:
        assert retained_status(broker)["bundle"] == {"name": "tiny-none", "sha256": old_sha, "slot": None}
        threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        with sender(broker) as s:
            done = s.send(DEVICE, update, chunk_size=16 * 1024)
            chunks = s.stats["chunks_sent"]
        time.sleep(1.0)  # requests keep going on the new engine
        stop.set()
        for t in threads:
            t.join(60)
        assert done["state"] == "done" and done["slot"] == "b" and done["bundle"] == "tiny-v2"
        assert chunks == -(-update.stat().st_size // (16 * 1024))
        assert server.engine.bundle.name == "tiny-v2" and server.scheduler.stats["engine_swaps"] == 1
        assert not errors, errors[:5]
        assert len(sent) > 10 and sorted(finals) == sorted(sent) and set(finals.values()) == {1}
        status = retained_status(broker)
        assert status["bundle"]["name"] == "tiny-v2" and status["bundle"]["slot"] == "b"
        assert status["bundle"]["sha256"] == done["sha256"] != old_sha
        assert status["last_update"]["outcome"] == "done"
        assert (prefix / "bundle").is_symlink() and ota.Slots(prefix).active() == "b"
        assert not (prefix / "state.ota" / "update.part").exists()  # the archive is not kept
    finally:
        stop.set()
        server.stop()


def test_a_switch_slower_than_the_sender_is_neither_sent_again_nor_staged_over_the_rollback_slot(
    tiny_bundle: Path, tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    # A request holds the old engine (its decode steps wait on `gate`) past the device's
    # swap_timeout_s and the sender's idle_s: the sender asks again (begin) while the device
    # is switching; it must hear `switching`, send no chunk twice, and get `done` once the
    # request ends. The rollback slot (a) keeps the old bundle. (Before the mend, the sender's
    # second begin started a new transfer, staged into slot a: the old bundle was gone.)
    prefix = device_prefix(tiny_bundle, tmp_path / "board")
    server = start_device(prefix, broker, keys[1], swap_timeout_s=0.5)
    update = make_update(tiny_bundle, tmp_path, keys[0])
    old_sha = ota.manifest_sha256(tiny_bundle)
    old_engine = server.engine
    gate, stepping = threading.Event(), threading.Event()
    step = old_engine.step

    def held_step(seqs: Any) -> None:
        stepping.set()
        gate.wait(60)
        step(seqs)

    old_engine.step = held_step  # type: ignore[method-assign]
    held, result = held_request(broker)
    try:
        held.start()
        assert stepping.wait(30)  # the request runs on the old engine
        with sender(broker, idle_s=1.0, timeout=60) as s:
            outcome: dict[str, Any] = {}
            t = threading.Thread(target=lambda: outcome.update(s.send(DEVICE, update, chunk_size=4096)))
            t.start()
            end = time.monotonic() + 60
            while s.stats["requeried"] < 3 and time.monotonic() < end:  # asked again while switching
                time.sleep(0.2)
            assert s.stats["requeried"] >= 3 and s.stats["switching"] >= 2 and t.is_alive()
            assert ota.Slots(prefix).active() == "b"  # the link moved; the engine waits
            assert ota.manifest_sha256(prefix / "slots" / "a") == old_sha  # rollback slot intact
            assert ota.last_outcome(prefix / "state.ota")["outcome"] == "switching"
            gate.set()
            t.join(60)
            held.join(60)
            chunks = -(-update.stat().st_size // 4096)
            assert outcome["state"] == "done" and outcome["slot"] == "b"
            assert s.stats["chunks_sent"] == chunks  # the archive went once
            assert result["r"].id == "held" and result["r"].usage["completion_tokens"] == 4
            # The same update again: its outcome at once, no chunk, no second swap.
            again = s.send(DEVICE, update, chunk_size=4096)
            assert again["state"] == "done" and again["sha256"] == outcome["sha256"]
            assert s.stats["chunks_sent"] == chunks
        assert server.scheduler.stats["engine_swaps"] == 1 and server.engine.bundle.name == "tiny-v2"
        assert ota.manifest_sha256(prefix / "slots" / "a") == old_sha
        assert retained_status(broker)["last_update"]["outcome"] == "done"
    finally:
        gate.set()
        held.join(60)
        server.stop()
    # A restart and a refused update later, the same update once more is `done`, not a transfer.
    server = start_device(prefix, broker, keys[1])
    qnn = make_update(
        tiny_bundle,
        tmp_path,
        keys[0],
        "qnn",
        lambda raw: raw.setdefault("requirements", {}).update(target="qnn-htp"),
    )
    try:
        with sender(broker) as s:
            with pytest.raises(UpdateError, match="wrong architecture"):
                s.send(DEVICE, qnn, chunk_size=4096)
            sent = s.stats["chunks_sent"]
            assert s.send(DEVICE, update, chunk_size=4096)["state"] == "done"
            assert s.stats["chunks_sent"] == sent
        assert ota.manifest_sha256(prefix / "slots" / "a") == old_sha
    finally:
        server.stop()


def test_a_reload_that_replaces_the_updates_waiting_swap_still_ends_done(
    tiny_bundle: Path,
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The update's swap waits for a running request (within swap_timeout_s) when a SIGHUP reload
    # swaps too: the reload replaces the update's swap and loads the slot link, already moved to
    # the update's slot. The update is applied, so the sender hears `done`, not a failed switch
    # (before the mend: "switch failed: engine swap replaced by a newer one", link committed).
    prefix = device_prefix(tiny_bundle, tmp_path / "board")
    server = start_device(prefix, broker, keys[1], swap_timeout_s=60)
    update = make_update(tiny_bundle, tmp_path, keys[0])
    gate, stepping = gate_method(server.engine, "step", monkeypatch)
    held, result = held_request(broker)
    try:
        held.start()
        assert stepping.wait(30)
        with sender(broker, timeout=90) as s:
            outcome: dict[str, Any] = {}
            t = threading.Thread(target=lambda: outcome.update(s.send(DEVICE, update, chunk_size=4096)))
            t.start()
            end = time.monotonic() + 60
            while server.scheduler._swap is None and time.monotonic() < end:  # the update's swap waits
                time.sleep(0.1)
            first = server.scheduler._swap
            assert first is not None and ota.Slots(prefix).active() == "b"
            reloaded: list[Any] = []
            reload = threading.Thread(target=lambda: reloaded.append(server.reload()))
            reload.start()
            while server.scheduler._swap is first and reload.is_alive():  # the reload replaces it
                time.sleep(0.1)
            time.sleep(1.0)  # the update's waiter hears it was replaced
            gate.set()
            reload.join(60)
            t.join(60)
            held.join(60)
        assert outcome["state"] == "done" and outcome["slot"] == "b"
        assert reloaded and server.scheduler.engine is reloaded[0]
        assert server.engine.bundle.name == "tiny-v2" and server.scheduler.stats["engine_swaps"] == 1
        assert ota.last_outcome(prefix / "state.ota")["outcome"] == "done"
        assert result["r"].usage["completion_tokens"] == 4
    finally:
        gate.set()
        held.join(60)
        server.stop()


def test_bad_updates_are_refused_with_their_reason_and_the_old_bundle_keeps_serving(
    tiny_bundle: Path, tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    prefix = device_prefix(tiny_bundle, tmp_path / "board")
    server = start_device(prefix, broker, keys[1])
    (tmp_path / "updates").mkdir()
    bad = bad_updates(tiny_bundle, tmp_path / "updates", keys)
    state = Raw(broker)
    state.subscribe(f"edge-llm/{DEVICE}/update/state")
    try:
        with sender(broker) as s:
            for name, (archive, words) in bad.items():
                with pytest.raises(UpdateError, match=words):
                    s.send(DEVICE, archive, chunk_size=16 * 1024)
                assert server.engine.bundle.name == "tiny-none", name
                assert answers(broker), name
                last = retained_status(broker)["last_update"]
                assert last["outcome"] == "refused" and re.search(words, last["error"]), name
            # A transfer cut off mid-way: the device names the missing chunks and keeps the rest.
            good = make_update(tiny_bundle, tmp_path, keys[0])
            with pytest.raises(UpdateError, match=r"truncated transfer: .* chunks missing"):
                s.send(DEVICE, good, chunk_size=4096, max_chunks=3)
        assert ota.Slots(prefix).active() in (None, "a")  # never switched
        assert not (prefix / "slots" / "b").exists()  # staged copies are removed
        assert answers(broker)
        seen: list[dict[str, Any]] = []
        while not state.messages.empty():
            seen.append(json.loads(state.messages.get().payload))
        assert all("error" in m for m in seen if m["state"] in ("refused", "incomplete"))
    finally:
        state.close()
        server.stop()


def test_a_transfer_resumes_after_the_sender_and_the_device_restart(
    tiny_bundle: Path, tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    prefix = device_prefix(tiny_bundle, tmp_path / "board")
    update = make_update(tiny_bundle, tmp_path, keys[0])
    total = -(-update.stat().st_size // 4096)
    server = start_device(prefix, broker, keys[1])
    try:
        with sender(broker) as s, pytest.raises(UpdateError, match="truncated transfer"):
            s.send(DEVICE, update, chunk_size=4096, max_chunks=5)  # the sender dies after 5 chunks
    finally:
        server.stop()  # and the device restarts
    have = (prefix / "state.ota" / "update.have").read_bytes()
    assert sum(have) == 5 and len(have) == total
    server = start_device(prefix, broker, keys[1])
    try:  # a new sender: `edge-llm update --mqtt`
        cli = [sys.executable, "-m", "edge_llm.cli", "update", "--mqtt", f"{broker.host}:{broker.port}"]
        cli += ["--device", DEVICE, "--chunk-size", "4096", str(update)]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{total - 5} chunk(s) sent" in done.stdout  # only what the device did not keep
        assert "now serving tiny-v2" in done.stdout and "in slot b" in done.stdout
        assert server.engine.bundle.name == "tiny-v2"
    finally:
        server.stop()


def _serve(prefix: Path, config: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "edge_llm.cli",
        "serve",
        "--bundle",
        str(prefix / "bundle"),
        "--config",
        str(config),
    ]
    cmd += ["--state", str(prefix / "state.sqlite"), *extra]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)


def test_a_slot_that_fails_to_start_n_times_is_rolled_back(
    tiny_bundle: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    prefix = device_prefix(tiny_bundle, tmp_path / "board")
    good = ota.apply_update(prefix, make_update(tiny_bundle, tmp_path, keys[0]), keys[1])
    assert good.slot == "b"
    # Slot a now gets a signed bundle that passes its checks but whose graph does not load at
    # start (as if the flash went bad after the switch): staged and committed as an update is.
    slots = ota.Slots(prefix)
    staging = slots.root / ".staging"
    shutil.copytree(slots.root / "b", staging)
    (staging / "model.onnx").write_bytes(b"garbage")
    state = prefix / "state.ota"
    kept = slots.root / ".kept"
    (slots.root / "a").rename(kept)
    staged = ota.Staged(slots, "a", "b", slots.root / "a", load_bundle(slots.root / "b"), "x", kept)
    staging.rename(staged.path)
    ota.commit(staged, state)
    assert slots.active() == "a" and not kept.exists()
    config = tmp_path / "board.toml"
    config.write_text("[ota]\nfailed_starts = 2\n")
    sock = tmp_path / "edge.sock"
    for attempt in (1, 2):
        proc = _serve(prefix, config, "--socket", str(sock))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, err
        assert f"start {attempt} since the switch to slot a" in err
    proc = _serve(prefix, config, "--socket", str(sock))
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "edge-llm: serving" in line:
                break
        assert any("rolled back to slot b: slot a failed to start 2 times" in line for line in lines), lines
        assert slots.active() == "b" and not (state / ota.BOOT_FILE).exists()
        assert ota.last_outcome(state)["outcome"] == "rolled_back"
    finally:
        proc.terminate()
        proc.wait(30)


def test_rollout_goes_canary_first_and_stops_when_the_canary_fails(
    tiny_bundle: Path, tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    config = tmp_path / "board.toml"
    config.write_text(f"[ota]\ntrusted_key = '{keys[1]}'\n")
    prefixes = {f"f{i}": device_prefix(tiny_bundle, tmp_path / f"board{i}") for i in range(3)}
    procs = []
    for device, prefix in prefixes.items():
        mqtt = ["--mqtt", f"{broker.host}:{broker.port}", "--device", device, "--fleet", "g1"]
        procs.append(_serve(prefix, config, *mqtt))
    try:
        for p in procs:
            assert p.stderr is not None
            for line in p.stderr:
                if "edge-llm: serving" in line:
                    break

        def qnn(raw: dict[str, Any]) -> None:
            raw.setdefault("requirements", {}).update(target="qnn-htp")

        bad = make_update(tiny_bundle, tmp_path, keys[0], "qnn", qnn)
        with sender(broker) as s:
            devices = s.group("g1")
            assert devices == ["f0", "f1", "f2"]
            report = rollout(s, devices, bad, canary=1, health_timeout=60)
        assert list(report.failed) == ["f0"] and "wrong architecture" in report.failed["f0"]
        assert report.untouched == ["f1", "f2"] and not report.updated
        old = ota.manifest_sha256(tiny_bundle)
        assert all(retained_status(broker, d)["bundle"]["sha256"] == old for d in prefixes)
        good = make_update(tiny_bundle, tmp_path, keys[0])
        cli = [
            sys.executable,
            "-m",
            "edge_llm.cli",
            "rollout",
            str(good),
            "--mqtt",
            f"{broker.host}:{broker.port}",
        ]
        done = subprocess.run(
            [*cli, "--group", "g1", "--canary", "1"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "f0: updated (canary, slot b" in done.stdout and "f2: updated (device, slot b" in done.stdout
        assert {retained_status(broker, d)["bundle"]["name"] for d in prefixes} == {"tiny-v2"}
        assert all(answers(broker, d) for d in prefixes)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def test_only_the_operator_account_may_publish_updates(
    tiny_bundle: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    # The ACL of docs/boards.md: the operator writes update topics; a device reads its own and
    # writes its state; anyone else (here a client that may read states) writes none of them.
    acl = (
        "user operator\ntopic readwrite edge-llm/#\n\n"
        "user intruder\ntopic read edge-llm/+/update/state\n\n"
        "pattern read edge-llm/%u/update/#\npattern write edge-llm/%u/update/state\n"
        "pattern write edge-llm/%u/status\n"
    )
    users = {"operator": "op", "ota1": "dev", "intruder": "x"}
    b = Broker(tmp_path / "acl-broker", users=users, acl=acl).start()
    try:
        prefix = device_prefix(tiny_bundle, tmp_path / "board")
        cfg = MqttConfig(host=b.host, port=b.port, device=DEVICE, username="ota1", password="dev")
        board = BoardConfig(mqtt=cfg, ota=OtaConfig(trusted_key=str(keys[1])))
        server = Server(Engine.load(prefix / "bundle"), board, state_path=prefix / "state.sqlite")
        server.start()
        update = make_update(tiny_bundle, tmp_path, keys[0])
        try:
            intruder = UpdateSender(Connection(b.host, b.port, "intruder", "x"), timeout=6, idle_s=2)
            with intruder as s, pytest.raises(UpdateError, match="no outcome"):
                s.send(DEVICE, update)
            assert server.engine.bundle.name == "tiny-none"
            with UpdateSender(Connection(b.host, b.port, "operator", "op"), timeout=120) as s:
                assert s.send(DEVICE, update)["state"] == "done"
        finally:
            server.stop()
    finally:
        b.stop()


def test_chunk_bookkeeping_counts_each_chunk_once() -> None:
    from edge_llm.ota_mqtt import Transfer, missing_ranges

    t = Transfer("0" * 64, 10 * 1024 + 1, 1024, bytearray([1, 0, 1] + [0] * 8))  # resumed: 2 held
    assert t.held == 2 and not t.complete
    for i in [1, 1, 3, *range(4, 11), 10]:  # QoS 1 redelivers: a chunk held twice counts once
        t.mark(i)
    assert t.held == 11 and t.complete and missing_ranges(t.have) == []
