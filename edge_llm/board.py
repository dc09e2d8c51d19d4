"""Board profiles: one TOML file per kind of board, in `configs/boards/`.

In: a TOML path. Out: a frozen `BoardConfig` — execution providers in order of preference with
their options, runtime threads and limits — and from it the `RunnerOptions` the engine takes.
Serving sections (`[server]`, `[sessions]`, `[socket]`, `[mqtt]`, `[mqtt.tls]`, `[http]`,
`[http.tls]`, `[keys]`) configure
`edge-llm serve`; every one is optional. Unknown keys and wrong types fail with the file and
dotted key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_llm.config import load_toml
from edge_llm.providers import ProviderSpec, parse_provider_list
from edge_llm.runner import RunnerOptions


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0
    spin: bool = True
    max_context: int = 0
    max_batch: int = 8
    prompt_lookup: int = 0  # draft tokens for prompt-lookup speculative decoding (greedy only)

    def __post_init__(self) -> None:
        if self.threads < 0 or self.max_context < 0 or self.max_batch < 1:
            raise ValueError("runtime: threads and max_context must be ≥ 0, max_batch ≥ 1")
        if not 0 <= self.prompt_lookup <= 16:
            raise ValueError("runtime: prompt_lookup must be in 0..16")


@dataclass(frozen=True)
class ServerConfig:
    state_dir: str = "~/.local/state/edge-llm"  # SQLite state (sessions, recent finals)
    max_queue: int = 16  # requests waiting; one more gets `busy` at once
    max_inflight_per_client: int = 4
    max_payload: int = 64 * 1024  # bytes per request message
    default_max_tokens: int = 256
    max_finals: int = 1000  # recent final replies kept for request-id deduplication
    shutdown_grace_s: float = 5.0  # on SIGTERM, how long the running request may finish

    def __post_init__(self) -> None:
        if min(self.max_queue, self.max_inflight_per_client, self.default_max_tokens, self.max_finals) < 1:
            raise ValueError("server: max_queue, max_inflight_per_client, default_max_tokens, max_finals ≥ 1")
        if self.max_payload < 256 or self.shutdown_grace_s < 0:
            raise ValueError("server: max_payload ≥ 256 and shutdown_grace_s ≥ 0")


@dataclass(frozen=True)
class SessionsConfig:
    system_prompt: str = ""  # prepended to new conversations; prefilled once and reused
    max_live: int = 4  # sessions whose KV cache stays in memory (LRU)
    ttl_days: float = 30.0  # history idle longer than this is deleted at startup

    def __post_init__(self) -> None:
        if self.max_live < 0 or self.ttl_days <= 0:
            raise ValueError("sessions: max_live ≥ 0 and ttl_days > 0")


@dataclass(frozen=True)
class SocketConfig:
    path: str = ""  # Unix domain socket (mode 0600); "" = none
    tcp_port: int = 0  # newline-delimited JSON on 127.0.0.1:PORT; 0 = none

    def __post_init__(self) -> None:
        if not 0 <= self.tcp_port <= 65535:
            raise ValueError("socket: tcp_port must be in 0..65535")


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    ca: str = ""  # CA bundle for the broker's certificate; "" = the system store
    cert: str = ""  # client certificate (optional)
    key: str = ""


@dataclass(frozen=True)
class MqttConfig:
    host: str = ""  # "" = MQTT off
    port: int = 1883
    device: str = ""  # topics edge-llm/<device>/...
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = ""  # "" = edge-llm-<device>; stable, so the broker keeps our session
    username: str = ""
    password: str = ""
    password_file: str = ""  # read at startup (keeps the secret out of the profile)
    tls: TlsConfig = field(default_factory=TlsConfig)
    keepalive: int = 30
    session_expiry_s: int = 86400  # broker keeps our subscriptions and queued requests this long
    fleet_group: str = ""  # also take $share/<group>/<prefix>/fleet/generate
    topic_prefix: str = "edge-llm"
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    # Stream chunks: 1 survives a broker hiccup; 0 halves the packets per token (no PUBACK each).
    # A lost chunk ends the client's streaming early; the final (always QoS 1) has the whole text.
    chunk_qos: int = 1

    def __post_init__(self) -> None:
        if self.chunk_qos not in (0, 1):
            raise ValueError("mqtt: chunk_qos must be 0 or 1")
        for name in ("device", "fleet_group", "topic_prefix"):
            if any(c in getattr(self, name) for c in "/+#"):
                raise ValueError(f"mqtt: {name} must not contain /, + or #")
        if self.host and not self.device:
            raise ValueError("mqtt: device is required when host is set")
        if not 0 < self.port <= 65535 or self.keepalive < 5 or self.session_expiry_s < 0:
            raise ValueError("mqtt: port in 1..65535, keepalive ≥ 5, session_expiry_s ≥ 0")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("mqtt: 0 < reconnect_min_s ≤ reconnect_max_s")


@dataclass(frozen=True)
class HttpTlsConfig:
    cert: str = ""  # server certificate chain (PEM); set with key to serve HTTPS
    key: str = ""
    ca: str = ""  # when set, clients must present a certificate signed by this CA (mutual TLS)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("http.tls: cert and key go together")
        if self.ca and not self.cert:
            raise ValueError("http.tls: ca (client certificates) needs cert and key")


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP API (extra `http`)."""

    host: str = ""  # "" = HTTP off; "127.0.0.1" local only, "0.0.0.0" every interface
    port: int = 8080
    model: str = ""  # the id /v1/models reports and requests may name; "" = the bundle's name
    tls: HttpTlsConfig = field(default_factory=HttpTlsConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("http: port must be in 0..65535 (0 = any free port)")


@dataclass(frozen=True)
class KeysConfig:
    """API keys and per-key limits for every transport (edge_llm/keys.py)."""

    file: str = ""  # keys file from `edge-llm keys add`; "" = no keys, every client served as before
    uids: dict[str, str] = field(default_factory=dict)  # Unix socket peer uid -> key name

    def __post_init__(self) -> None:
        if self.uids and not self.file:
            raise ValueError("keys: uids need a keys file")
        if not all(uid.isdigit() for uid in self.uids):
            raise ValueError("keys.uids: each key is a numeric uid")


@dataclass(frozen=True)
class BoardConfig:
    name: str = "default"
    description: str = ""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    providers: tuple[dict[str, str | int | float | bool], ...] = ({"name": "cpu"},)
    server: ServerConfig = field(default_factory=ServerConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)

    def provider_specs(self) -> tuple[ProviderSpec, ...]:
        return parse_provider_list(self.providers)

    def runner_options(self) -> RunnerOptions:
        r = self.runtime
        return RunnerOptions(
            providers=self.provider_specs(),
            threads=r.threads,
            spin=r.spin,
            max_context=r.max_context,
            max_batch=r.max_batch,
            prompt_lookup=r.prompt_lookup,
        )


def load_board(path: str | Path | None) -> BoardConfig:
    if path is None:
        return BoardConfig()
    board = load_toml(path, BoardConfig)
    board.provider_specs()  # validate provider names and options now, not at first request
    return board
