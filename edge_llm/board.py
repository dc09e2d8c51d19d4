"""Board profiles: one TOML file per kind of board, in `configs/boards/`.

In: a TOML path. Out: a frozen `BoardConfig` — execution providers in order of preference with
their options, and the `[runtime]` table (`RunnerOptions`: threads, limits, memory budget) that
the engine takes.
Serving sections (`[server]`, `[sessions]`, `[socket]`, `[mqtt]`, `[mqtt.tls]`, `[http]`,
`[http.tls]`, `[keys]`, `[metrics]`, `[grpc]`, `[grpc.tls]`) configure `edge-llm serve`; every
one is optional.
Unknown keys and wrong types fail with the file and dotted key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from edge_llm.config import load_toml
from edge_llm.providers import ProviderSpec, parse_provider_list
from edge_llm.topics import REPLY_LEVEL, level_problem, topic_problem


@dataclass(frozen=True)
class RunnerOptions:
    """The `[runtime]` table of a board profile and what the engine and runner take: one
    definition for both (the providers come from the profile's `[[providers]]` list, not from
    `[runtime]`, so `load_toml` skips that field)."""

    threads: int = 0  # intra-op threads; 0: one per core
    spin: bool = True  # busy-wait between ops: lower latency per token on an idle board
    max_context: int = 0  # 0: the bundle's context length (shared layout: buffer size)
    max_batch: int = 8  # shared layout: rows of the batch KV cache (continuous batching)
    prompt_lookup: int = 0  # draft tokens for prompt-lookup speculative decoding (greedy only)
    # "auto": the bundle's trained draft when it has one (edge_llm/speculate.py), else prompt
    # lookup when prompt_lookup > 0; "draft" / "lookup" force one ("draft" needs a draft in the
    # bundle); "off": plain decoding, one token per forward.
    speculation: Literal["auto", "off", "draft", "lookup"] = "auto"
    draft_tokens: int = 6  # the most draft tokens one verify checks (the length adapts below it)
    # Run every one-token forward of a lone sequence as two tokens (a dummy after it, its KV
    # written past the length and never read). ORT's GroupQueryAttention rounds the last bit of
    # a 1-token step differently from a multi-token one, and MatMulNBits' int8 activations
    # (accuracy_level 4) blow that up to logit gaps of ~0.75 on SmolLM2; padded, a decode step
    # runs the kernel path a speculative verify runs, so greedy speculation gives plain
    # decoding's output bit for bit (edge_llm/speculate.py). Costs a wider forward per token.
    pad_decode: bool = False
    # On a bundle padded behind `query_pad` ([fuse] pad_query_row): also pad forwards of several
    # rows. Off, batched steps run unpadded (the dummy cost ~9% of 8-stream throughput) and a
    # request's greedy output can differ, at a near-tie, between steps batched and alone; on, it
    # does not (speculation is exact either way). Without the query_seqlens graph, padded rows
    # cannot share a forward over a past: on, the portable graph serves one row at a time.
    pad_batches: bool = False
    # Memory budget in MB (0: none). `edge_llm.memory.plan_memory` derives max_batch,
    # max_context, prefill_chunk and [sessions] max_live from it (the configured values are upper
    # limits) and refuses at start-up a budget the bundle cannot fit.
    memory_mb: int = 0
    # Feed prompts to the graph in pieces of at most this many tokens (0: whole). ORT's workspace
    # for one forward grows with tokens x context; a budget sets this to bound it.
    prefill_chunk: int = 0
    # The KV cache type, among the bundle's graphs (export [fuse] kv_cache): "auto" = the main
    # graph's; "int8" = a quarter of the fp32 bytes per token (per-channel scales, +0.6% ppl).
    kv_cache: Literal["auto", "fp32", "int8"] = "auto"
    # Use the bundle's query_seqlens ("ragged") graph where this onnxruntime runs it (>= 1.32)
    # and the engine batches (max_batch > 1: one row is never ragged); false: the portable graph.
    ragged: bool = True
    # On that graph, a request arriving while others decode with at most this many prompt tokens
    # to feed (after a reused prefix) joins their decode steps, one token per step, instead of a
    # prefill forward of its own. 0 (default): always prefill alone, which measured cheaper on
    # SmolLM2 / 2 CPU cores in throughput and time to first token (benchmarks/README.md).
    fold_max: int = 0
    # Padding token-rows a folding step may add, so a newcomer's prompt goes in several tokens a
    # step (a step of r rows feeds up to 1 + fold_padding // r each; padding costs what real
    # tokens do). 0 (default): one token a step, no padding; 2 / 4 tokens a row made a batch-8
    # step 1.3x / 2.0x dearer on 2 CPU cores (benchmarks/README.md "Batched prefill").
    fold_padding: int = 0
    providers: tuple[ProviderSpec, ...] = field(default=(ProviderSpec("cpu"),), metadata={"toml": False})

    def __post_init__(self) -> None:
        if self.threads < 0 or self.max_context < 0 or self.max_batch < 1:
            raise ValueError("runtime: threads and max_context must be ≥ 0, max_batch ≥ 1")
        if not 0 <= self.prompt_lookup <= 16:
            raise ValueError("runtime: prompt_lookup must be in 0..16")
        if self.speculation not in ("auto", "off", "draft", "lookup"):
            raise ValueError("runtime: speculation must be 'auto', 'off', 'draft' or 'lookup'")
        if not 1 <= self.draft_tokens <= 16:
            raise ValueError("runtime: draft_tokens must be in 1..16")
        if self.memory_mb < 0 or self.prefill_chunk < 0:
            raise ValueError("runtime: memory_mb and prefill_chunk must be ≥ 0")
        if self.fold_max < 0 or self.fold_padding < 0:
            raise ValueError("runtime: fold_max and fold_padding must be ≥ 0")
        if self.kv_cache not in ("auto", "fp32", "int8"):
            raise ValueError(f"runtime: kv_cache must be 'auto', 'fp32' or 'int8', not {self.kv_cache!r}")


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
    # Where a request may ask for its replies (MQTT 5 Response Topic, 3.1.1 `reply_to`): topics
    # under one of these prefixes, level-wise ("apps/a" covers "apps/a/x"). Empty = anywhere but
    # `$` topics and device topics (`<topic_prefix>/…` other than `<topic_prefix>/reply/…`), which
    # are refused in any case. A request whose reply topic is refused is dropped and logged.
    reply_prefixes: tuple[str, ...] = ()
    # Largest MQTT packet the device publishes; a bigger reply is not sent (a final becomes a short
    # `internal` error). 0 = the limit the broker advertises (MQTT 5 only): set it for a 3.1.1
    # broker with a `max_packet_size`, which closes the connection of a client that exceeds it.
    max_packet_bytes: int = 0
    # Retained JSON summary on <topic_prefix>/<device>/metrics every this many seconds (0 = off):
    # fleet health from one subscription instead of scraping every board.
    metrics_interval_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_interval_s <= 86400:
            raise ValueError("mqtt: metrics_interval_s must be in 0..86400 (0 = off)")
        if self.chunk_qos not in (0, 1):
            raise ValueError("mqtt: chunk_qos must be 0 or 1")
        for name in ("device", "fleet_group", "topic_prefix"):
            problem = level_problem(getattr(self, name), f"mqtt: {name}")
            if problem is not None:
                raise ValueError(problem)
        if self.device in (REPLY_LEVEL, "fleet"):  # those levels carry replies and fleet requests
            raise ValueError(f"mqtt: device must not be {self.device!r} (a reserved topic level)")
        for prefix in self.reply_prefixes:
            problem = topic_problem(prefix, "mqtt: reply_prefixes entry")
            if problem is not None or prefix.startswith("$"):
                raise ValueError(problem or f"mqtt: reply_prefixes entry {prefix!r} is a $-topic")
        if self.host and not self.device:
            raise ValueError("mqtt: device is required when host is set")
        if self.max_packet_bytes and self.max_packet_bytes < 256:
            raise ValueError("mqtt: max_packet_bytes must be 0 (the broker's limit) or ≥ 256")
        if not 0 < self.port <= 65535 or self.keepalive < 5 or self.session_expiry_s < 0:
            raise ValueError("mqtt: port in 1..65535, keepalive ≥ 5, session_expiry_s ≥ 0")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("mqtt: 0 < reconnect_min_s ≤ reconnect_max_s")


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be empty: 127.0.0.1; PORT 0: any free port) for a listening server."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # HOST:PORT for Prometheus text at /metrics (extra `metrics`); "" = off

    def __post_init__(self) -> None:
        if self.listen:
            parse_listen(self.listen, "metrics: listen")


@dataclass(frozen=True)
class ServerTlsConfig:
    """TLS of a server transport ([http.tls], [grpc.tls])."""

    cert: str = ""  # server certificate chain (PEM); set with key to serve over TLS
    key: str = ""
    ca: str = ""  # when set, clients must present a certificate signed by this CA (mutual TLS)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key go together")
        if self.ca and not self.cert:
            raise ValueError("ca (client certificates) needs cert and key")


@dataclass(frozen=True)
class GrpcConfig:
    listen: str = ""  # HOST:PORT for the gRPC LLMService (extra `grpc`); "" = off
    tls: ServerTlsConfig = field(default_factory=ServerTlsConfig)

    def __post_init__(self) -> None:
        if self.listen:
            parse_listen(self.listen, "grpc: listen")


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP API (extra `http`)."""

    host: str = ""  # "" = HTTP off; "127.0.0.1" local only, "0.0.0.0" every interface
    port: int = 8080
    model: str = ""  # the id /v1/models reports and requests may name; "" = the bundle's name
    tls: ServerTlsConfig = field(default_factory=ServerTlsConfig)

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
class OtaConfig:
    """Signed bundle updates taken over MQTT by a running server (edge_llm/ota_mqtt.py)."""

    trusted_key: str = ""  # ed25519 public key updates must be signed with; "" = no OTA over MQTT
    prefix: str = ""  # holds the `bundle` link and `slots/`; "" = the folder of serve's --bundle
    max_bytes: int = 4 << 30  # largest update archive taken (it is written to the state dir)
    max_chunk_bytes: int = 1 << 20  # largest chunk a sender may announce
    failed_starts: int = 3  # starts after a switch that never reached READY before rolling back
    swap_timeout_s: float = 300.0  # how long the switch may wait for running requests

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_chunk_bytes < 1024:
            raise ValueError("ota: max_bytes must be ≥ 1 and max_chunk_bytes ≥ 1024")
        if self.failed_starts < 1 or self.swap_timeout_s <= 0:
            raise ValueError("ota: failed_starts must be ≥ 1 and swap_timeout_s > 0")


@dataclass(frozen=True)
class BoardConfig:
    name: str = "default"
    description: str = ""
    runtime: RunnerOptions = field(default_factory=RunnerOptions)
    providers: tuple[dict[str, str | int | float | bool], ...] = ({"name": "cpu"},)
    server: ServerConfig = field(default_factory=ServerConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)

    def provider_specs(self) -> tuple[ProviderSpec, ...]:
        return parse_provider_list(self.providers)

    def runner_options(self) -> RunnerOptions:
        return replace(self.runtime, providers=self.provider_specs())


def load_board(path: str | Path | None) -> BoardConfig:
    if path is None:
        return BoardConfig()
    board = load_toml(path, BoardConfig)
    board.provider_specs()  # validate provider names and options now, not at first request
    return board
