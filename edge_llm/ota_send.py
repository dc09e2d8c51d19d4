"""Bundle updates over MQTT, operator side: `edge-llm update --mqtt` and `edge-llm rollout`.

In: a signed bundle (a folder, tarred here, or a `.tar` of one), a broker and device ids. Out:
the update sent in QoS 1 chunks on each device's update topics (protocol: `edge_llm/ota_mqtt.py`)
and each device's outcome — `done` with the new bundle's sha256 and slot, or an `UpdateError`
carrying the device's own reason (bad signature, wrong architecture, truncated, self-test...).

Sending is resumable: `begin` is answered with the chunks the device is missing, so a sender
started again after a crash sends only those; a device that restarted mid-transfer says what it
kept. At most `window` chunks are unacknowledged (PUBACK) at once, so neither side buffers the
whole archive. A device that stops answering gets `begin` again (a query) every `idle_s`; it
answers with where the transfer stands. `switching` means accepted (checked, self-tested, the
slot link moved; running requests finish on the old bundle): the sender waits for `done`.

Rollout: a fleet group (devices whose retained status names the group) or a list, canaries first.
Each device is updated, then must show the new bundle.json sha256 on its status topic and answer
a probe prompt over MQTT; the first canary that fails stops the rollout and leaves every device
not yet updated on the old bundle. The other devices follow one by one under the same check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge_llm import mqtt_common
from edge_llm.bundle import sha256_file
from edge_llm.errors import TransportError, UpdateError
from edge_llm.ota_mqtt import update_topics

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256 * 1024


def archive_of(source: Path, work: Path) -> Path:
    """`source` as a tar: a `.tar` as it is, a signed bundle folder tarred into `work`."""
    if source.is_file():
        return source
    if not (source / "bundle.json").is_file():
        raise UpdateError(f"{source}: neither a bundle folder (no bundle.json) nor a .tar of one")
    if not (source / "bundle.sig").is_file():
        raise UpdateError(f"{source}: not signed (no bundle.sig): run `edge-llm sign` first")
    out = work / f"{source.name}.tar"
    with tarfile.open(out, "w") as tar:
        tar.add(source, arcname=source.name)
    return out


def manifest_sha256_in(archive: Path) -> str:
    """sha256 of the bundle.json inside a bundle archive: what a device reports once it serves it."""
    try:
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if m.isfile() and Path(m.name).name == "bundle.json" and m.name.count("/") <= 1:
                    f = tar.extractfile(m)
                    assert f is not None
                    return hashlib.sha256(f.read()).hexdigest()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UpdateError(f"{archive}: not a readable tar ({exc})") from None
    raise UpdateError(f"{archive}: no bundle.json in it")


@dataclass
class Connection:
    """Broker address and login for the operator's client."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    topic_prefix: str = "edge-llm"

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)


class UpdateSender:
    """One operator MQTT connection that sends updates and watches devices' state and status."""

    def __init__(self, conn: Connection, timeout: float = 600.0, idle_s: float = 20.0) -> None:
        self.conn = conn
        self.timeout = timeout
        self.idle_s = idle_s
        self.stats: Counter[str] = Counter()
        self._states: dict[str, queue.Queue[dict[str, Any]]] = {}
        self.status: dict[str, dict[str, Any]] = {}  # device -> its latest retained status
        self._status_changed = threading.Condition()
        self._lock = threading.Lock()
        self._client = mqtt_common.new_client(
            f"edge-llm-ota-{uuid.uuid4().hex[:10]}",
            v5=True,
            clean=True,
            username=conn.username,
            password=conn.password,
            tls=conn.tls,
            ca=conn.ca,
            cert=conn.cert,
            key=conn.key,
        )
        self._client.max_inflight_messages_set(64)
        self._client.on_message = self._on_message
        self._connected = threading.Event()
        self._client.on_connect = self._on_connect
        self.max_packet: int | None = None

    def __enter__(self) -> UpdateSender:
        unreachable = mqtt_common.connect(self._client, self.conn.host, self.conn.port, self.conn.tls)
        if unreachable is not None:
            raise TransportError(f"broker {self.conn.host}:{self.conn.port} unreachable: {unreachable}")
        self._client.loop_start()
        if not self._connected.wait(10):
            self._client.loop_stop()
            raise TransportError(f"broker {self.conn.host}:{self.conn.port} did not accept the connection")
        self._subscribe(
            [(f"{self.conn.topic_prefix}/+/status", 1), (f"{self.conn.topic_prefix}/+/update/state", 1)]
        )
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # -- paho callbacks --

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the operator connection: %s", reason)
            return
        self.max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self._connected.set()

    def _subscribe(self, topics: list[tuple[str, int]]) -> None:
        done = threading.Event()
        self._client.on_subscribe = lambda *_a: done.set()
        self._client.subscribe(topics)
        if not done.wait(10):
            raise TransportError("the broker did not confirm the subscriptions")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        try:
            doc = json.loads(bytes(msg.payload)) if msg.payload else {}
        except ValueError:
            return
        if not isinstance(doc, dict) or len(parts) < 3:
            return
        if msg.retain and parts[-1] == "state":
            return  # an earlier transfer's outcome, kept by the broker: not an answer to us
        device = parts[-3] if parts[-2:] == ["update", "state"] else parts[-2]
        if parts[-1] == "status":
            with self._status_changed:
                self.status[device] = doc
                self._status_changed.notify_all()
        else:
            self._queue(device).put(doc)

    def _queue(self, device: str) -> queue.Queue[dict[str, Any]]:
        with self._lock:
            return self._states.setdefault(device, queue.Queue())

    # -- one device --

    def _chunk_size(self, wanted: int) -> int:
        if self.max_packet:  # the broker's limit, less the PUBLISH header and topic
            wanted = min(wanted, self.max_packet - 512)
        return max(1024, wanted)

    def send(
        self,
        device: str,
        archive: Path,
        chunk_size: int = DEFAULT_CHUNK,
        window: int = 8,
        max_chunks: int | None = None,
        resends: int = 3,
    ) -> dict[str, Any]:
        """Send `archive` to `device`; return its `done` state or raise UpdateError with the
        device's reason. `max_chunks`: stop after that many chunks and commit (what a sender cut
        off mid-way leaves; the device reports the transfer truncated)."""
        topics = update_topics(self.conn.topic_prefix, device)
        sha, size = sha256_file(archive), archive.stat().st_size
        chunk_size = self._chunk_size(chunk_size)
        states = self._queue(device)
        while not states.empty():  # what was retained before this transfer
            states.get_nowait()
        begin = json.dumps({"transfer": sha, "size": size, "chunk_size": chunk_size}).encode()
        self._client.publish(topics["begin"], begin, qos=1)
        deadline = time.monotonic() + self.timeout
        sent_total = rounds = 0
        asked = True  # a `receiving` state answers our begin (else it is progress: ignored)
        switching = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if switching:
                    raise UpdateError(f"{device}: accepted, but still switching after {self.timeout:g} s"
                                      " (its running requests hold the old bundle)")  # fmt: skip
                raise UpdateError(f"{device}: no outcome within {self.timeout:g} s (offline or stuck?)")
            try:
                state = states.get(timeout=min(left, self.idle_s))
            except queue.Empty:
                self.stats["requeried"] += 1  # silence: ask again (a restarted device answers)
                self._client.publish(topics["begin"], begin, qos=1)
                asked = True
                continue
            if state.get("transfer", sha) != sha:
                # About an earlier transfer, e.g. its refusal published again for a late commit
                # (no transfer: our begin itself was refused).
                continue
            kind = state.get("state")
            if kind == "done":
                return state
            if kind == "switching":  # accepted: checked, self-tested, the link switched; `done` follows
                switching = True
                self.stats["switching"] += 1
            if kind in ("refused", "failed"):
                raise UpdateError(f"{device}: update {kind}: {state.get('error')}")
            if kind == "incomplete" and (max_chunks is not None or rounds > resends):
                raise UpdateError(f"{device}: {state.get('error')}")
            if not (kind == "incomplete" or (kind == "receiving" and asked)):
                continue  # progress, verifying, testing, switching: the outcome follows
            asked = False
            missing = [i for a, b in state.get("missing", []) for i in range(a, b)]
            if max_chunks is not None:
                missing = missing[: max(0, max_chunks - sent_total)]
            rounds += 1
            sent_total += self._send_chunks(topics["chunk"], sha, archive, chunk_size, missing, window)
            self._client.publish(topics["commit"], json.dumps({"transfer": sha}).encode(), qos=1)

    def _send_chunks(
        self, base: str, sha: str, archive: Path, chunk_size: int, indices: list[int], window: int
    ) -> int:
        pending: list[mqtt.MQTTMessageInfo] = []
        with archive.open("rb") as f:
            for index in indices:
                f.seek(index * chunk_size)
                info = self._client.publish(f"{base}/{sha}/{index}", f.read(chunk_size), qos=1)
                pending.append(info)
                self.stats["chunks_sent"] += 1
                while len(pending) >= window:  # PUBACKs pace the sender: bounded memory both sides
                    pending.pop(0).wait_for_publish(self.timeout)
        for info in pending:
            info.wait_for_publish(self.timeout)
        return len(indices)

    # -- status and health --

    def wait_status(self, device: str, predicate: Any, timeout: float) -> dict[str, Any] | None:
        """The device's retained status once `predicate(status)` holds, or None after `timeout`."""
        end = time.monotonic() + timeout
        with self._status_changed:
            while True:
                status = self.status.get(device)
                if status is not None and predicate(status):
                    return status
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._status_changed.wait(left)

    def group(self, name: str, wait_s: float = 2.0) -> list[str]:
        """Devices online whose retained status names fleet group `name`."""
        time.sleep(wait_s)  # the retained statuses arrive right after subscribing
        with self._status_changed:
            return sorted(
                d for d, s in self.status.items()
                if s.get("state") == "online" and (s.get("capabilities") or {}).get("fleet_group") == name
            )  # fmt: skip

    def probe(self, device: str, prompt: str, timeout: float) -> str:
        """Ask `device` a prompt over MQTT; its answer, or UpdateError when it does not answer."""
        from edge_llm.client import MqttClient

        c = self.conn
        try:
            with MqttClient(
                c.host, c.port, device=device, username=c.username, password=c.password,
                tls=c.tls, ca=c.ca, cert=c.cert, key=c.key, topic_prefix=c.topic_prefix, timeout=timeout,
            ) as client:  # fmt: skip
                result = client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=8)
        except Exception as exc:  # the SDK's errors: timeout, error replies, connection
            raise UpdateError(f"{device}: health probe failed: {type(exc).__name__}: {exc}") from None
        return str(result.text)


@dataclass
class RolloutReport:
    bundle_sha256: str
    order: list[str]
    updated: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    untouched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.untouched


def rollout(
    sender: UpdateSender,
    devices: list[str],
    archive: Path,
    canary: int = 1,
    probe: str = "What is the capital of France?",
    health_timeout: float = 120.0,
    **send_kw: Any,
) -> RolloutReport:
    """Update `devices` canaries first (the first `canary` of them); stop at the first failure."""
    if not devices:
        raise UpdateError("rollout: no devices (none online in the group?)")
    expected = manifest_sha256_in(archive)
    report = RolloutReport(expected, list(devices))
    for i, device in enumerate(devices):
        role = "canary" if i < canary else "device"
        try:
            state = sender.send(device, archive, **send_kw)
            status = sender.wait_status(
                device, lambda s: (s.get("bundle") or {}).get("sha256") == expected, health_timeout
            )
            if status is None:
                raise UpdateError(f"{device}: its status does not show bundle sha256 {expected[:16]}…")
            answer = sender.probe(device, probe, health_timeout)
        except UpdateError as exc:
            report.failed[device] = str(exc)
            report.untouched = devices[i + 1 :]
            log.error("rollout stopped at %s %s: %s", role, device, exc)
            return report
        report.updated[device] = {"role": role, "slot": state.get("slot"), "switch_s": state.get("switch_s"),
                                  "answer": answer}  # fmt: skip
        log.info("rollout: %s %s updated and healthy (slot %s)", role, device, state.get("slot"))
    return report


def temp_archive(source: Path) -> tuple[Path, tempfile.TemporaryDirectory[str]]:
    """`archive_of` in a temporary folder the caller keeps alive while sending."""
    work = tempfile.TemporaryDirectory(prefix="edge-llm-ota-")
    return archive_of(source, Path(work.name)), work


__all__ = ["Connection", "RolloutReport", "UpdateSender", "archive_of", "rollout"]
