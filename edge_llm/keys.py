"""API keys and rate limits: one gate that every transport's requests pass through.

In: who sent a request — an API key when one was presented (HTTP `Authorization: Bearer`, or the
request's `key` field on MQTT and the socket) and otherwise the transport's identity string
(`uid:N` for a Unix socket peer, `mqtt-user:NAME` for an MQTT per-user topic). Out: a `Grant` for
the key entry that sender maps to, or `UnauthorizedError` / `RateLimitedError` (with a
retry-after) before anything is queued. `Dispatcher` consults the gate, so the socket, MQTT and
HTTP share one mechanism and one set of buckets per identity.

The keys file (JSON, mode 0600, written atomically) stores each key's SHA-256, never the key: a
key is 256 random bits, so a fast hash is enough — there is nothing to brute-force that a slow
KDF would protect, and checking a request stays a dictionary lookup. `edge-llm keys add` prints
the key once. A running server re-reads the file when it changes, so `keys add` / `keys revoke`
take effect without a restart.

Limits per identity (0 = none): requests per minute and tokens per minute are token buckets that
hold a minute's worth (a client may burst its whole minute, then goes at the steady rate);
tokens are charged when the request finishes (prompt + completion, from its usage), so a
request is admitted while the token bucket is above zero and a large one may take it below,
delaying the next. `max_concurrent` bounds requests queued or running at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_llm.errors import ConfigError, RateLimitedError, UnauthorizedError

FILE_VERSION = 1
KEY_PREFIX = "ekl-"
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_RELOAD_EVERY_S = 1.0  # how often a running server looks at the file's mtime


def bearer_key(header: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` value (HTTP header, gRPC metadata); None without one."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int = 0  # 0 = no limit
    tokens_per_minute: int = 0
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        if min(self.requests_per_minute, self.tokens_per_minute, self.max_concurrent) < 0:
            raise ConfigError("limits must be ≥ 0 (0 = no limit)")


@dataclass(frozen=True)
class KeyEntry:
    name: str
    sha256: str
    created: str
    limits: Limits = field(default_factory=Limits)


# --- the file --------------------------------------------------------------------------------


def load_entries(path: str | Path) -> list[KeyEntry]:
    """The entries of a keys file; a missing file is an empty list, a malformed one an error."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable keys file: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != FILE_VERSION
        or not isinstance(data.get("keys"), list)
    ):
        raise ConfigError(f"{path}: not a keys file (version {FILE_VERSION} with a keys list)")
    out = []
    for i, item in enumerate(data["keys"]):
        try:
            limits = Limits(
                **{
                    k: int(item.get(k, 0))
                    for k in ("requests_per_minute", "tokens_per_minute", "max_concurrent")
                }
            )
            out.append(KeyEntry(str(item["name"]), str(item["sha256"]), str(item.get("created", "")), limits))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}: keys[{i}] is malformed: {exc}") from None
    return out


def save_entries(path: str | Path, entries: list[KeyEntry]) -> None:
    """Write atomically with mode 0600 from the start (never a moment another user can read it)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "version": FILE_VERSION,
        "keys": [
            {"name": e.name, "sha256": e.sha256, "created": e.created, **asdict(e.limits)} for e in entries
        ],
    }
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_key(path: str | Path, name: str, limits: Limits) -> str:
    """Add an entry named `name`; return the new key (the file keeps only its hash)."""
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r}: 1..64 of A-Z a-z 0-9 . _ @ -")
    entries = load_entries(path)
    if any(e.name == name for e in entries):
        raise ConfigError(f"a key named {name!r} exists; revoke it first")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save_entries(path, [*entries, KeyEntry(name, hash_key(key), created, limits)])
    return key


def revoke_key(path: str | Path, name: str) -> bool:
    entries = load_entries(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        return False
    save_entries(path, kept)
    return True


# --- buckets and the gate --------------------------------------------------------------------


class _Bucket:
    """A token bucket holding `per_minute` at most, refilled at per_minute / 60 per second."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the level reaches `amount` (0 when it already has)."""
        return max(0.0, (amount - self.level) / self.rate)


class _State:
    """Live accounting of one identity (kept across file reloads while its limits stay)."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.requests = _Bucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self.tokens = _Bucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None
        self.in_flight = 0


class Grant:
    """One admitted request; `release` (exactly once, at its final reply) frees its slot and
    charges its tokens."""

    def __init__(self, gate: KeyGate, name: str) -> None:
        self.gate = gate
        self.name = name
        self._released = False

    def release(self, tokens: int = 0) -> None:
        if not self._released:
            self._released = True
            self.gate._release(self.name, tokens)


class KeyGate:
    """Authenticates senders and applies each identity's limits; safe from any thread."""

    def __init__(
        self,
        path: str | Path | None = None,
        uids: Mapping[str, str] | None = None,
        *,
        entries: list[KeyEntry] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`path`: the keys file (re-read when it changes); `entries`: fixed entries instead (tests).
        `uids`: Unix socket peer uid -> key name, for local clients that send no key."""
        self.path = Path(path).expanduser() if path is not None else None
        self.uids = {str(k): v for k, v in (uids or {}).items()}
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}
        self._by_hash: dict[str, KeyEntry] = {}
        self._by_name: dict[str, KeyEntry] = {}
        self._mtime: int | None = None
        self._checked = -math.inf
        if entries is not None:
            self._index(entries)
        else:
            self._maybe_reload(force=True)
        unknown = sorted(set(self.uids.values()) - set(self._by_name))
        if unknown:  # a profile naming a key that is not in the file is a typo worth failing on
            raise ConfigError(f"[keys] uids name key(s) not in the keys file: {', '.join(unknown)}")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def authenticate(self, identity: str, key: str | None) -> str:
        """The key name this sender maps to; UnauthorizedError when none."""
        self._maybe_reload()
        with self._lock:
            return self._name_for(identity, key)

    def admit(self, identity: str, key: str | None) -> Grant:
        """Authenticate and take one request from the identity's limits, or raise."""
        self._maybe_reload()
        now = self.clock()
        with self._lock:
            name = self._name_for(identity, key)
            state = self._state(name, now)
            limits = state.limits
            if limits.max_concurrent and state.in_flight >= limits.max_concurrent:
                # No clock can say when a slot frees; a second is a typical short answer's time.
                raise RateLimitedError(
                    f"key {name!r} already has {limits.max_concurrent} requests in flight", 1.0
                )
            waits = []
            if state.requests is not None:
                state.requests.refill(now)
                waits.append(("requests_per_minute", state.requests.wait_for(1.0)))
            if state.tokens is not None:
                state.tokens.refill(now)
                # Admitted while above zero (the cost is known only at the end); see the docstring.
                waits.append(("tokens_per_minute", state.tokens.wait_for(1e-9)))
            over = [(w, what) for what, w in waits if w > 0]
            if over:
                wait, what = max(over)
                raise RateLimitedError(f"key {name!r} is over its {what}; retry in {wait:.2f} s", wait)
            if state.requests is not None:
                state.requests.level -= 1.0
            state.in_flight += 1
        return Grant(self, name)

    def owner(self, key: str) -> str | None:
        """The name of the entry `key` belongs to (None: unknown), charging nothing: who may
        cancel the requests made with it."""
        self._maybe_reload()
        with self._lock:
            entry = self._by_hash.get(hash_key(key))
            return entry.name if entry is not None else None

    # -- internals (lock held where noted) --

    def _name_for(self, identity: str, key: str | None) -> str:  # lock held
        if key is not None:
            entry = self._by_hash.get(hash_key(key))
            if entry is None:
                raise UnauthorizedError("unknown or revoked API key")
            return entry.name
        kind, _, who = identity.partition(":")
        name = None
        if kind == "uid":
            name = self.uids.get(who)
        elif kind == "mqtt-user":  # the broker checked this user's password; its name is the key's
            name = who if who in self._by_name else None
        if name is None or name not in self._by_name:
            raise UnauthorizedError(
                "an API key is required (HTTP: Authorization: Bearer <key>; MQTT and socket: the "
                "request's key field)"
            )
        return name

    def _state(self, name: str, now: float) -> _State:  # lock held
        limits = self._by_name[name].limits
        state = self._states.get(name)
        if state is None or state.limits != limits:
            fresh = _State(limits, now)
            if state is not None:
                fresh.in_flight = state.in_flight
            self._states[name] = state = fresh
        return state

    def _release(self, name: str, tokens: int) -> None:
        now = self.clock()
        with self._lock:
            state = self._states.get(name)
            if state is None:
                return
            state.in_flight = max(0, state.in_flight - 1)
            if state.tokens is not None and tokens > 0:
                state.tokens.refill(now)
                state.tokens.level -= tokens

    def _index(self, entries: list[KeyEntry]) -> None:
        by_hash = {e.sha256: e for e in entries}
        by_name = {e.name: e for e in entries}
        with self._lock:
            self._by_hash, self._by_name = by_hash, by_name
            for gone in set(self._states) - set(by_name):
                del self._states[gone]

    def _maybe_reload(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < _RELOAD_EVERY_S:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            if force:
                raise ConfigError(
                    f"{self.path}: keys file not found (create it with `edge-llm keys add`)"
                ) from None
            mtime = None
        if mtime == self._mtime and not force:
            return
        try:
            entries = load_entries(self.path)
        except ConfigError:
            if force:
                raise
            return  # a half-edited file: keep serving with the entries we have
        self._mtime = mtime
        self._index(entries)


def usage_tokens(usage: Mapping[str, Any] | None) -> int:
    """Tokens a finished request costs: prompt + completion."""
    if not usage:
        return 0
    return int(usage.get("prompt_tokens", 0) or 0) + int(usage.get("completion_tokens", 0) or 0)


__all__ = ["Grant", "KeyEntry", "KeyGate", "Limits", "add_key", "hash_key", "load_entries", "revoke_key"]
