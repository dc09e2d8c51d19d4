"""Bundle updates over MQTT, device side: a running server receives, checks and switches to them.

In: an update archive (a `.tar` of a signed bundle) sent in chunks on the device's own topics
(prefix P, device D), by `edge-llm update --mqtt` (`edge_llm/ota_send.py`):
- `P/D/update/begin` `{"transfer": "<sha256 of the archive>", "size": N, "chunk_size": C}`;
- `P/D/update/chunk/<transfer>/<index>`: the archive's bytes `[index*C, index*C + C)`, raw;
- `P/D/update/commit` `{"transfer": ...}`: every chunk has been sent (a check for gaps).
All QoS 1. Out: `P/D/update/state` (retained): the transfer's progress (`have`, `missing` chunk
ranges) and then its outcome (`done`, or `refused` / `incomplete` with `error`); and the device's
status topic, which names the active bundle (name, sha256 of bundle.json, slot) and the last
update's outcome.

Resumable both ways: chunks go straight to `STATE/update.part` and a one-byte-per-chunk map
(`.have`) beside it, so a device restarted mid-transfer keeps what it has (and says so in its
retained state); a sender restarted mid-way sends `begin` again and the device answers with the
chunks it is missing. A `begin` for another archive discards the partial one. A `begin` for the
transfer being applied gets its current state again (`switching` while running requests hold the
old engine past `[ota] swap_timeout_s`; `done` follows when they end), and one for the transfer
that installed the bundle served now gets its `done` again, also after a restart: a sender asking
again never makes the device stage the same archive into the inactive slot, the rollback one.
Held chunks are counted as they arrive (O(1) per chunk). Sizes are bounded
(`[ota] max_bytes`, `max_chunk_bytes`); each chunk's length is checked, and the whole archive's
sha256 once it is complete.

Then, on this module's own thread (the scheduler's worker keeps serving): the archive's sha256,
`ota.stage_update` (unpack into the inactive slot, signature against `[ota] trusted_key`, files
listed and hashed, target and requirements), a self-test (load as the server does, answer a
probe prompt), the slot link switch, and `Server.swap` (the scheduler's one swap step: running
requests finish on the old engine, queued ones run on the new one). Any refusal leaves the old
bundle serving and is published with its reason.

Who may publish here is the broker's business: only an operator account may write
`P/+/update/begin|chunk/#|commit`, and a device account reads only its own (docs/boards.md). The
signature is what makes an update trusted; the ACL keeps others from wasting a device's flash.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_llm import ota
from edge_llm.board import OtaConfig
from edge_llm.bundle import sha256_file
from edge_llm.errors import EdgeLLMError, SwapSupersededError, UpdateError

log = logging.getLogger(__name__)

_SHA = re.compile(r"[0-9a-f]{64}")
MAX_RANGES = 256  # missing ranges listed in one state message (the rest follow as chunks arrive)
_PROGRESS_S = 0.5  # at most this often a `receiving` state while chunks arrive


def update_topics(prefix: str, device: str) -> dict[str, str]:
    base = f"{prefix}/{device}/update"
    return {
        "begin": f"{base}/begin",
        "chunk": f"{base}/chunk",  # + /<transfer>/<index>
        "commit": f"{base}/commit",
        "state": f"{base}/state",
    }


def missing_ranges(have: bytes | bytearray, limit: int = MAX_RANGES) -> list[list[int]]:
    """[[start, end), ...] of the chunks not held (at most `limit` ranges)."""
    out: list[list[int]] = []
    i, n = 0, len(have)
    while i < n and len(out) < limit:
        if have[i]:
            i += 1
            continue
        j = i
        while j < n and not have[j]:
            j += 1
        out.append([i, j])
        i = j
    return out


@dataclass
class Transfer:
    sha256: str
    size: int
    chunk_size: int
    have: bytearray
    held: int = -1  # chunks held: counted as they arrive, so `complete` is O(1) per chunk

    def __post_init__(self) -> None:
        if self.held < 0:
            self.held = sum(self.have)

    @property
    def chunks(self) -> int:
        return len(self.have)

    @property
    def complete(self) -> bool:
        return self.held == len(self.have)

    def mark(self, index: int) -> None:
        if not self.have[index]:
            self.have[index] = 1
            self.held += 1

    def chunk_bytes(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


class OtaReceiver:
    """Takes updates for `server` over its MQTT transport; see the module docstring."""

    def __init__(self, server: Any, transport: Any, cfg: OtaConfig, prefix: Path, state_dir: Path) -> None:
        if not Path(cfg.trusted_key).expanduser().is_file():
            raise UpdateError(f"[ota] trusted_key {cfg.trusted_key}: no such public key file")
        self.server = server
        self.transport = transport
        self.cfg = cfg
        self.key = Path(cfg.trusted_key).expanduser()
        self.prefix = prefix
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.part = self.dir / "update.part"
        self.have_file = self.dir / "update.have"
        self.meta_file = self.dir / "update.json"
        self.topics = update_topics(transport.cfg.topic_prefix, transport.cfg.device)
        self._lock = threading.Lock()  # guards transfer, files and _busy (paho thread vs ours)
        self.transfer: Transfer | None = self._load_partial()
        self._busy: str | None = None  # the transfer being applied
        self._current: dict[str, Any] = {}  # its latest state message (a sender asking again gets it)
        self._last: dict[str, Any] = {}  # the last outcome's state message (a late commit gets it)
        self._applied: dict[str, Any] = self._applied_before()  # `done` of the update served now
        self._apply = threading.Event()
        self._stop = threading.Event()
        self._last_progress = 0.0
        self._thread = threading.Thread(target=self._run, name="edge-llm-ota", daemon=True)

    # -- lifecycle --

    def start(self) -> None:
        self.transport.add_handler(self.topics["begin"], self._on_begin)
        self.transport.add_handler(self.topics["chunk"] + "/+/+", self._on_chunk)
        self.transport.add_handler(self.topics["commit"], self._on_commit)
        self._thread.start()
        with self._lock:
            if self.transfer is not None:  # kept across a restart: say what is still missing
                self._publish_progress(force=True)
                if self.transfer.complete:
                    self._apply.set()

    def stop(self) -> None:
        self._stop.set()
        self._apply.set()
        self._thread.join(5.0)

    def _applied_before(self) -> dict[str, Any]:
        """The recorded switch to the bundle this device serves now (a restart keeps a sender's
        `begin` for it from starting a second transfer), else {}. One recorded as `switching`
        finished by the restart: it is `done`."""
        rec = ota.last_applied(self.dir) or {}
        if not self._serving(rec.get("sha256")):
            return {}
        return {**rec, "state": "done", "outcome": "done"}

    def _serving(self, manifest_sha: Any) -> bool:
        return manifest_sha is not None and self.server.bundle_info().get("sha256") == manifest_sha

    # -- partial transfer on disk --

    def _load_partial(self) -> Transfer | None:
        try:
            meta = json.loads(self.meta_file.read_text())
            have = bytearray(self.have_file.read_bytes())
            t = Transfer(str(meta["sha256"]), int(meta["size"]), int(meta["chunk_size"]), have)
        except (OSError, ValueError, KeyError, TypeError):
            self._discard_files()
            return None
        expected = -(-t.size // t.chunk_size)
        if len(have) != expected or not self.part.is_file() or self.part.stat().st_size != t.size:
            log.warning("ota: the partial update on disk is inconsistent; discarded")
            self._discard_files()
            return None
        log.info("ota: resuming transfer %s… (%d of %d chunks held)", t.sha256[:12], t.held, t.chunks)
        return t

    def _discard_files(self) -> None:
        for path in (self.meta_file, self.have_file, self.part):
            path.unlink(missing_ok=True)

    def _new_transfer(self, sha: str, size: int, chunk_size: int) -> Transfer:
        self._discard_files()
        chunks = -(-size // chunk_size)
        with self.part.open("wb") as f:
            f.truncate(size)  # sparse: the flash is used as chunks arrive
        self.have_file.write_bytes(bytes(chunks))
        meta = {"sha256": sha, "size": size, "chunk_size": chunk_size}
        tmp = self.meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.meta_file)  # written last: a crash before this leaves no transfer
        return Transfer(sha, size, chunk_size, bytearray(chunks))

    # -- messages (paho's thread: bounded work, no model code) --

    def _on_begin(self, msg: Any) -> None:
        try:
            doc = json.loads(bytes(msg.payload))
            sha, size, chunk_size = doc["transfer"], doc["size"], doc["chunk_size"]
            if not (isinstance(sha, str) and _SHA.fullmatch(sha)):
                raise ValueError("transfer must be the archive's sha256 (64 lowercase hex digits)")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, chunk_size)):
                raise ValueError("size and chunk_size must be integers")
        except (ValueError, KeyError, TypeError) as exc:
            self._state({"state": "refused", "error": f"bad begin message: {exc}"})
            return
        if not 0 < size <= self.cfg.max_bytes:
            self._refuse(sha, f"the update is {size} bytes; this device takes 1..{self.cfg.max_bytes}")
            return
        if not 1024 <= chunk_size <= self.cfg.max_chunk_bytes:
            self._refuse(sha, f"chunk_size {chunk_size}: this device takes 1024..{self.cfg.max_chunk_bytes}")
            return
        with self._lock:
            if self._busy is not None:
                if self._busy != sha:
                    self._refuse(sha, f"busy: applying update {self._busy[:12]}…; send again after it")
                elif self._current.get("transfer") == sha:
                    self._state(self._current)  # a sender asking again: where it stands (its outcome follows)
                return
            applied = self._applied
            if applied.get("transfer") == sha and self._serving(applied.get("sha256")):
                # Applied and still served: the same outcome again. Taking the archive again would
                # stage it into the inactive slot, the bundle a rollback goes back to.
                self._state(applied)
                return
            t = self.transfer
            if t is None or (t.sha256, t.size, t.chunk_size) != (sha, size, chunk_size):
                if t is not None:
                    log.info("ota: transfer %s… replaced by %s…", t.sha256[:12], sha[:12])
                try:
                    self.transfer = self._new_transfer(sha, size, chunk_size)
                except OSError as exc:
                    self.transfer = None
                    self._refuse(sha, f"cannot store the update: {exc}")
                    return
                log.info("ota: receiving %s… (%d bytes in %d chunks)", sha[:12], size, self.transfer.chunks)
            self._publish_progress(force=True)  # a resuming sender learns what is missing
            if self.transfer is not None and self.transfer.complete:
                self._apply.set()

    def _on_chunk(self, msg: Any) -> None:
        sha, index_text = msg.topic.rsplit("/", 2)[-2:]
        with self._lock:
            t = self.transfer
            if t is None or sha != t.sha256 or self._busy is not None:
                return  # a stale chunk of an earlier or finished transfer (QoS 1 redelivery)
            try:
                index = int(index_text)
            except ValueError:
                return
            data = bytes(msg.payload)
            if not 0 <= index < t.chunks or len(data) != t.chunk_bytes(index):
                log.warning("ota: chunk %s of %s… has %d bytes; ignored", index_text, sha[:12], len(data))
                return
            if not t.have[index]:
                try:
                    with self.part.open("r+b") as f:
                        f.seek(index * t.chunk_size)
                        f.write(data)
                    with self.have_file.open("r+b") as f:  # marked after the data is written
                        f.seek(index)
                        f.write(b"\x01")
                except OSError as exc:
                    log.error("ota: cannot store chunk %d: %s", index, exc)
                    return
                t.mark(index)
            if t.complete:
                self._apply.set()
            else:
                self._publish_progress()

    def _on_commit(self, msg: Any) -> None:
        try:
            sha = json.loads(bytes(msg.payload))["transfer"]
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            t = self.transfer
            if self._busy == sha or (t is not None and t.sha256 == sha and t.complete):
                return  # being applied: its outcome follows
            if t is None or t.sha256 != sha:
                if self._last.get("transfer") == sha:  # applied or refused before this commit came
                    self._state(self._last)
                else:
                    self._state({"state": "incomplete", "transfer": sha, "error": "truncated transfer: no"
                                 " chunks of this update are held (send begin first)"})  # fmt: skip
                return
            missing = t.chunks - t.held
            self._state(
                {**self._progress(t), "state": "incomplete",
                 "error": f"truncated transfer: {missing} of {t.chunks} chunks missing; the chunks held"
                 " are kept, send the missing ones"},
            )  # fmt: skip

    # -- state messages --

    def _progress(self, t: Transfer) -> dict[str, Any]:
        return {
            "transfer": t.sha256,
            "size": t.size,
            "chunk_size": t.chunk_size,
            "chunks": t.chunks,
            "have": t.held,
            "missing": missing_ranges(t.have),
        }

    def _publish_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.transfer is None or (not force and now - self._last_progress < _PROGRESS_S):
            return
        self._last_progress = now
        self._state({**self._progress(self.transfer), "state": "receiving"})

    def _state(self, doc: dict[str, Any]) -> None:
        payload = json.dumps({"device": self.transport.cfg.device, **doc}).encode()
        self.transport.publish(self.topics["state"], payload, retain=True)

    def _say(self, doc: dict[str, Any]) -> None:
        """A state of the transfer being applied (this module's thread)."""
        with self._lock:
            self._current = doc
        self._state(doc)

    def _refuse(self, sha: str, error: str, stage: str = "refused") -> None:
        log.error("ota: update %s… %s: %s", sha[:12], stage, error)
        ota.record_outcome(self.dir, {"outcome": stage, "transfer": sha, "error": error})
        self._last = {"state": stage, "transfer": sha, "error": error}
        self._state(self._last)
        self.server.refresh_status()  # status() reads the recorded outcome

    # -- applying (this module's thread) --

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply.wait()
            self._apply.clear()
            if self._stop.is_set():
                return
            with self._lock:
                t = self.transfer
                if t is None or not t.complete or self._busy is not None:
                    continue
                self._busy = t.sha256
            try:
                self._apply_transfer(t)
            except Exception as exc:  # a bug must not end the thread or leave the device busy
                log.exception("ota: applying %s… failed", t.sha256[:12])
                self._refuse(t.sha256, f"internal error: {type(exc).__name__}: {exc}", "failed")
            finally:
                with self._lock:
                    self._busy = None
                    if self.transfer is t:
                        self.transfer = None
                        self._discard_files()

    def _wait_swap(self) -> bool:
        """Wait for the scheduler's latest swap; False if the server stops first (the next start
        serves the committed slot)."""
        while not self.server.scheduler.wait_swap(1.0):
            if self._stop.is_set():
                return False
        return True

    def _apply_transfer(self, t: Transfer) -> None:
        self._say({"state": "verifying", "transfer": t.sha256})
        got = sha256_file(self.part)
        if got != t.sha256:
            self._refuse(t.sha256, f"sha256 mismatch: the {t.size} bytes received hash to"
                         f" {got[:16]}…, not the announced {t.sha256[:16]}…")  # fmt: skip
            return
        options = self.server.engine.options
        try:
            staged = ota.stage_update(self.prefix, self.part, self.key, options)
        except UpdateError as exc:
            self._refuse(t.sha256, str(exc))
            return
        self._say({"state": "testing", "transfer": t.sha256, "bundle": staged.bundle.name})
        try:
            engine = ota.load_for_test(staged.path, options)
            answer = ota.probe_engine(engine)
        except UpdateError as exc:
            ota.discard(staged)
            self._refuse(t.sha256, str(exc))
            return
        self._say({"state": "switching", "transfer": t.sha256})
        switched = {"transfer": t.sha256, "bundle": staged.bundle.name, "sha256": staged.sha256,
                    "slot": staged.slot, "previous": staged.previous}  # fmt: skip
        # Recorded before the link moves: a device restarted from here on serves the new slot and
        # answers this transfer's `begin` with its outcome (`_applied_before`).
        ota.record_outcome(self.dir, {"outcome": "switching", **switched}, applied=True)
        ota.commit(staged, self.dir)  # the link first: a crash from here on restarts on the new slot
        t0 = time.monotonic()
        try:
            if not self.server.swap(engine, timeout=self.cfg.swap_timeout_s):
                # Running requests hold the old engine past swap_timeout_s. The swap still happens
                # when they end; until then a sender asking again hears `switching`, then `done`.
                log.warning("ota: running requests still hold the old bundle after %g s; switching when"
                            " they finish", self.cfg.swap_timeout_s)  # fmt: skip
                self.server.refresh_status()
                self._say({"state": "switching", "transfer": t.sha256, "waiting_s": self.cfg.swap_timeout_s,
                           "note": "running requests finish on the old bundle first"})  # fmt: skip
                if not self._wait_swap():
                    return
        except SwapSupersededError:
            # A newer swap replaced this one before it happened (a SIGHUP reload, which loads the
            # slot link committed above): waited for below, like one replaced after the timeout.
            if not self._wait_swap():
                return
        except EdgeLLMError as exc:
            self._refuse(t.sha256, f"switch failed: {exc}", "failed")
            return
        # A reload may have replaced this swap (before or after the timeout): the update is
        # applied if the engine serving now runs from this slot, not merely the link moved.
        serving = Path(self.server.scheduler.engine.bundle.path).resolve()
        if serving != Path(staged.path).resolve():
            self._refuse(t.sha256, f"switch replaced by a swap to {serving}; the link names slot"
                         f" {staged.slot}, which the next start serves", "failed")  # fmt: skip
            return
        switch_s = round(time.monotonic() - t0, 3)
        done = {"outcome": "done", **switched, "switch_s": switch_s}
        outcome = ota.record_outcome(self.dir, done, applied=True)
        log.info("ota: serving %s from slot %s (switch %.3f s)", staged.bundle.name, staged.slot, switch_s)
        self.server.refresh_status()  # status() reads the recorded outcome
        with self._lock:
            self._last = self._applied = {"state": "done", **outcome, "answer": answer}
        self._state(self._last)
