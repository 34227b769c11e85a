"""Configuration: one source of truth.

Process settings come from the environment (prefix ``HETERO_ROUTER_``) and the
command line; the backends come from a pool file (YAML). Both are validated
here, at start-up, with messages that name the field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import ssl
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from backends.base import Role
from backends.config_files import DocumentError, host_port, problem, problems, read_yaml_file
from router import defaults
from router.errors import ConfigError
from router.scheduling.concurrency_limit import LimitConfig
from router.scheduling.prefix import DEFAULT_BLOCKS_PER_BACKEND
from router.scheduling.slo import Slo

ENV_PREFIX = "HETERO_ROUTER_"
# Every duration setting is at most a day: a larger one is a unit mistake, and an
# infinite one (1e999 reads as inf) would leave the router waiting forever.
MAX_SECONDS = 86_400.0
# A mock device's time scale: 0 skips the modelled waits, 1 is real time; a device a
# thousand times slower than modelled is no use.
MAX_TIME_SCALE = 1000.0
# More router processes than this is a typo: each holds its own backend connections,
# health checks and KV event subscriptions.
MAX_WORKERS = 64


Address = Annotated[str, AfterValidator(host_port)]


def _unset_if_empty(value: object) -> object:
    """An empty variable (``FOO=``, as manifests often set one) leaves the setting unset."""
    return None if value == "" else value


class Settings(BaseSettings):
    """Router process settings. Every field can be set as HETERO_ROUTER_<FIELD>."""

    # No float setting means NaN or an infinity; both would be read from "nan" or "1e999".
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", allow_inf_nan=False)

    grpc_address: Address = defaults.GRPC_ADDRESS
    http_address: Address = defaults.HTTP_ADDRESS
    pool_file: Path | None = Field(
        default=None, description="Pool file (YAML); the packaged default cluster when unset."
    )
    # TLS for the gRPC front door and the HTTP door (PEM files); both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # mTLS: with a CA bundle (PEM), both doors require a client certificate it signed.
    tls_client_ca_file: Path | None = None
    # Changed TLS files are picked up without a restart: by the gRPC door at its next
    # handshake, by the HTTP door within this many seconds.
    tls_reload_interval_s: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    # Bearer tokens clients must present (one per line) on Generate, ListBackends
    # and /v1/*; health, /healthz and /readyz stay open, and so do reflection and
    # /metrics unless auth_reflection / auth_metrics.
    auth_token_file: Path | None = None
    auth_reflection: bool = False
    auth_metrics: bool = False
    # A door listening beyond loopback needs auth_token_file or tls_client_ca_file;
    # true serves it open anyway (logged as a warning at start).
    insecure: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    # Share of successful (and cancelled, and shed) requests that get a "request
    # finished" log line, 0..1; failed ones always do.
    request_log_sample_rate: float = Field(default=1.0, ge=0, le=1)
    # One log line per HTTP request (method, path, status, duration, bytes); the HTTP
    # door logs its 4xx and 5xx answers either way.
    http_access_log: bool = False
    # OpenTelemetry traces (the ``tracing`` extra), exported over OTLP/gRPC to this
    # collector (``host:port``, ``http://host:port`` or ``https://host:port``); unset:
    # no tracing, and nothing of OpenTelemetry is loaded. TLS unless the endpoint is
    # ``http://`` or otlp_traces_insecure is set. trace_sample_ratio is the share of
    # new traces recorded; a request whose client sent a traceparent follows its flag.
    otlp_traces_endpoint: Annotated[str | None, BeforeValidator(_unset_if_empty)] = None
    otlp_traces_insecure: bool = False
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)

    # Request limits: anything outside them is INVALID_ARGUMENT, never sent on.
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=4096, ge=1)
    max_prompt_tokens: int = Field(default=8192, ge=1)
    max_stop_strings: int = Field(default=8, ge=0)

    # Scheduling: the policy file (one profile per SLO class; the packaged
    # router/defaults/policy.yaml when unset) and shortcuts that override it in every profile.
    policy_file: Path | None = Field(
        default=None, description="Scheduling policy file (YAML); the packaged default when unset."
    )
    decider: str | None = Field(
        default=None, description="Decider name replacing every profile's (e.g. prompt-length)."
    )
    picker: str | None = Field(
        default=None, description="Picker name replacing every profile's (e.g. round-robin)."
    )
    split_min_prompt_tokens: int | None = Field(
        default=None,
        ge=0,
        description="min_prompt_tokens of the prompt-length and cost-model deciders.",
    )
    bytes_per_token: float = Field(
        default=1.0,
        gt=0,
        description="Prompt bytes per token for the length estimate (1.0 for the byte-level mock).",
    )

    # Deadlines of each leg: far below the engines' minutes-long defaults, so a
    # stuck backend fails one request promptly instead of hanging it.
    prefill_timeout_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    decode_timeout_s: float = Field(default=600.0, gt=0, le=MAX_SECONDS)
    # A split whose decode leg sends no token this long after the prefill answered (a
    # stalled KV read, a NIXL handshake to a restarted engine) is served colocated on
    # the decode backend instead; only while no token has reached the client.
    handoff_timeout_s: float = Field(default=15.0, gt=0, le=MAX_SECONDS)
    abort_timeout_s: float = Field(default=2.0, gt=0, le=MAX_SECONDS)
    # Stalls: a stream whose backend sends nothing for the larger of stall_timeout_s and
    # stall_step_multiple predicted decode steps, or whose first token is later than the
    # larger of stall_timeout_s and prefill_deadline_multiple predicted times to first
    # token (at most prefill_timeout_s), has failed on that backend.
    stall_timeout_s: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    stall_step_multiple: float = Field(default=50.0, gt=0)
    prefill_deadline_multiple: float = Field(default=4.0, gt=0)

    # Failures: an attempt that fails before any token reached the client is tried again
    # on other backends, at most max_attempts in all; after tokens, the request resumes on
    # another backend from them (migration; off: the client gets the error). Retries in
    # progress (until their first frame) stay within retry_budget_percent of the requests
    # in flight (at least retry_budget_min), so that failures do not multiply the load;
    # one over budget waits up to stall_timeout_s for a share.
    max_attempts: int = Field(default=3, ge=1)
    migration: bool = True
    retry_budget_percent: float = Field(default=20.0, ge=0, le=100)
    retry_budget_min: int = Field(default=3, ge=0)
    # Passive outlier detection: this many failed requests in a row eject a backend for
    # outlier_base_ejection_s times the ejections so far (at most 10x), never more than
    # outlier_max_ejected_percent of the backends of one role and model at once.
    outlier_consecutive_failures: int = Field(default=5, ge=1)
    outlier_base_ejection_s: float = Field(default=30.0, ge=0, le=MAX_SECONDS)
    outlier_max_ejected_percent: float = Field(default=50.0, ge=0, le=100)

    # Admission: at most `limit` requests are served at once; the others wait in a
    # FIFO per priority (at most queue_limit each), the most urgent admitted first, and
    # a request finding its queue full, or whose wait would miss its time to first
    # token, is shed (RESOURCE_EXHAUSTED). The limit adapts to the time from admission
    # to the first token (router.scheduling.concurrency_limit.py); max_in_flight is its
    # ceiling, and the limit itself with adaptive_concurrency off.
    max_in_flight: int = Field(default=1024, ge=1)
    queue_limit: int = Field(default=256, ge=0)
    adaptive_concurrency: bool = True
    concurrency_initial_limit: int = Field(default=LimitConfig.initial, ge=1)
    concurrency_min_limit: int = Field(default=LimitConfig.minimum, ge=1)
    # A window of first-token latencies lasts this long (and holds at least 8).
    concurrency_window_s: float = Field(default=LimitConfig.interval_s, gt=0, le=MAX_SECONDS)
    # A first token within baseline * (1 + buffer) is no congestion, nor one within
    # this share of the default SLO class's TTFT target.
    concurrency_latency_buffer: float = Field(default=LimitConfig.buffer, ge=0)
    concurrency_ttft_slo_share: float = Field(default=0.25, ge=0, le=1)
    # Time per output token within baseline * (1 + buffer) is batching, not
    # congestion, nor within this share of the default class's TPOT target.
    concurrency_tpot_buffer: float = Field(default=LimitConfig.tpot_buffer, ge=0)
    concurrency_tpot_slo_share: float = Field(default=0.5, ge=0, le=1)
    # The baseline is the lowest window latency of this last stretch.
    concurrency_baseline_window_s: float = Field(
        default=LimitConfig.baseline_window_s, gt=0, le=MAX_SECONDS
    )
    # Streams one client (its bearer token with auth on, else its address) may have
    # open at once, queued or served; 0: no cap. Behind a proxy every client has the
    # proxy's address: raise it, or give clients tokens.
    max_streams_per_client: int = Field(default=128, ge=0)
    # Requests one client may start per second (a token bucket of
    # client_request_burst requests, refilled at this rate), refused with
    # RESOURCE_EXHAUSTED / 429 beyond it; 0: no rate limit. Counted like the cap above.
    max_requests_per_s_per_client: float = Field(default=0.0, ge=0)
    # The bucket's size: requests a client may start at once; 0: one second's worth.
    client_request_burst: int = Field(default=0, ge=0)
    # A stream whose reader has taken nothing for this long is cancelled (the
    # backends abort its work and free its KV).
    write_stall_timeout_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    # Slow and greedy HTTP clients: a connection that has not sent a complete request
    # head this long after it opened is closed, as is one idle (or part-way through its
    # next request head) this long after its last response; a body must arrive within
    # http_body_timeout_s (else 408) and be at most http_max_body_bytes (else 413); a
    # connection past http_max_connections open at once gets a 503 and is closed.
    http_header_timeout_s: float = Field(default=10.0, gt=0, le=MAX_SECONDS)
    http_keepalive_timeout_s: float = Field(default=75.0, gt=0, le=MAX_SECONDS)
    http_body_timeout_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS)
    http_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    http_max_connections: int = Field(default=4096, ge=1)
    # Prompt block hashes remembered per backend for prefix-cache affinity.
    prefix_index_blocks_per_backend: int = Field(default=DEFAULT_BLOCKS_PER_BACKEND, ge=1)

    health_interval_s: float = Field(default=1.0, gt=0, le=MAX_SECONDS)
    health_timeout_s: float = Field(default=1.0, gt=0, le=MAX_SECONDS)
    # Health checks in a row that time out before a healthy backend leaves service (a
    # refused or failed check takes it out at once).
    health_unhealthy_threshold: int = Field(default=3, ge=1)
    drain_grace_s: float = Field(default=10.0, ge=0, le=MAX_SECONDS)
    # A backend leaving the pool (gone from the pool file or from discovery) takes no
    # new request; its streams may finish this long, then fail over to other backends.
    backend_drain_timeout_s: float = Field(default=30.0, ge=0, le=MAX_SECONDS)
    # How often the pool and policy files are looked at for a change (a ConfigMap
    # update); 0: only on SIGHUP.
    config_reload_interval_s: float = Field(default=5.0, ge=0, le=MAX_SECONDS)
    device_ready_timeout_s: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    # Router processes sharing both doors' ports (SO_REUSEPORT), each a full router
    # under one supervising parent (router/workers.py); 1: the router is this process.
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    # The cyclic garbage collector: once serving, what start-up made is frozen out of
    # every collection (gc.freeze) and the youngest generation is collected after this
    # many allocations instead of CPython's 700 (router/gc_tuning.py); 0 leaves the
    # collector as CPython sets it. A collection's pause grows with it: about 0.3 us an
    # object the youngest generation holds.
    gc_gen0_threshold: int = Field(default=10_000, ge=0, le=10_000_000)

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if (self.auth_reflection or self.auth_metrics) and self.auth_token_file is None:
            raise ValueError("auth_reflection and auth_metrics need auth_token_file")
        endpoint = self.otlp_traces_endpoint or ""
        if self.otlp_traces_insecure and endpoint.startswith("https://"):
            raise ValueError("otlp_traces_insecure contradicts an https:// otlp_traces_endpoint")
        return self

    def exposed_doors(self) -> list[str]:
        """The address settings of the doors that listen beyond loopback."""
        return [
            name
            for name, address in (
                ("grpc_address", self.grpc_address),
                ("http_address", self.http_address),
            )
            if not is_loopback(address)
        ]

    def check_exposure(self) -> None:
        """Refuses (ConfigError) a door listening beyond loopback with no client
        authentication, a token file or mTLS, unless ``insecure`` says to serve it open."""
        if self.auth_token_file is not None or self.tls_client_ca_file is not None:
            return
        exposed = self.exposed_doors()
        if exposed and not self.insecure:
            name = exposed[0]
            raise ConfigError(
                f"{name} {getattr(self, name)} listens beyond loopback with no client "
                "authentication: set auth_token_file or tls_client_ca_file, or "
                "HETERO_ROUTER_INSECURE=true (--insecure) to serve it open"
            )

    def client_burst(self) -> int:
        """The per-client token bucket's size (client_request_burst, or one second's worth)."""
        if self.client_request_burst:
            return self.client_request_burst
        return max(1, math.ceil(self.max_requests_per_s_per_client))

    def auth_tokens(self) -> frozenset[str]:
        """The accepted bearer tokens; empty when no token file is configured."""
        if self.auth_token_file is None:
            return frozenset()
        try:
            lines = self.auth_token_file.read_text().splitlines()
        except OSError as error:
            raise ConfigError(
                f"cannot read auth_token_file {self.auth_token_file}: {error.strerror}"
            ) from error
        tokens = frozenset(line.strip() for line in lines if line.strip())
        if not tokens:
            raise ConfigError(f"auth_token_file {self.auth_token_file} holds no token")
        return tokens

    def concurrency_limit(self, slo: Slo | None) -> LimitConfig | None:
        """The adaptive limit's configuration, its floors a share of ``slo`` (the default
        SLO class's targets); None when the limit is max_in_flight."""
        if not self.adaptive_concurrency:
            return None
        return LimitConfig(
            initial=self.concurrency_initial_limit,
            minimum=min(self.concurrency_min_limit, self.max_in_flight),
            maximum=self.max_in_flight,
            interval_s=self.concurrency_window_s,
            buffer=self.concurrency_latency_buffer,
            tpot_buffer=self.concurrency_tpot_buffer,
            ttft_floor_s=self.concurrency_ttft_slo_share * ((slo and slo.ttft_s) or 0.0),
            tpot_floor_s=self.concurrency_tpot_slo_share * ((slo and slo.tpot_s) or 0.0),
            baseline_window_s=self.concurrency_baseline_window_s,
        )

    def tls_files(self) -> TlsFiles | None:
        """The PEM files both doors serve TLS with (and verify clients by); None without TLS.
        ConfigError names the file that cannot be read or is not what it should be."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        files = TlsFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        check_tls_files(files)
        return files


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A door's TLS: its certificate chain and key, and the CA its clients' certificates
    must be signed by (None: no client certificate asked for)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file) + (
            () if self.client_ca_file is None else (self.client_ca_file,)
        )


def is_loopback(address: str) -> bool:
    """Whether a listening address (``host:port``, ``[v6]:port`` or ``unix:path``) is
    reachable from this host only: 127.0.0.0/8, ::1, localhost or a unix socket. An
    empty host, 0.0.0.0, :: and any other name are not."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from(overrides: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> Settings:
    """The settings of the environment with ``overrides`` (by field name) applied.

    ConfigError says every problem on one line, naming the variable (HETERO_ROUTER_X) or,
    for a field of ``flags`` (field name -> flag), the flag it came from."""
    flags = flags or {}
    try:
        return Settings(**overrides)
    except SettingsError as error:  # a variable pydantic-settings cannot even decode
        raise ConfigError(f"settings: {error}") from None
    except ValidationError as error:
        said = []
        for issue in error.errors():
            field = str(issue["loc"][0]) if issue["loc"] else ""
            if not field:
                said.append(problem(issue))
                continue
            name = (
                flags[field]
                if field in overrides and field in flags
                else ENV_PREFIX + field.upper()
            )
            said.append(f"{name}: {problem(issue, issue['loc'][1:]).removeprefix('(top): ')}")
        raise ConfigError(f"settings: {'; '.join(said)}") from None


def read_pem(path: Path, setting: str, kind: str) -> bytes:
    """The bytes of a PEM file holding a ``kind`` block ("CERTIFICATE", "PRIVATE KEY");
    ConfigError names the setting and the file when it cannot be read or holds none."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {setting} {path}: {error.strerror}") from None
    if not re.search(rb"-----BEGIN [A-Z0-9 ]*" + kind.encode() + rb"-----", data):
        raise ConfigError(f"{setting} {path} is not a PEM file with a {kind.lower()}")
    return data


def check_tls_files(files: TlsFiles) -> None:
    """The files are PEM and parse, the key is the certificate's, and the client CA
    bundle (if one) holds certificates; ConfigError names the file at fault."""
    cert_setting, key_setting = f"{ENV_PREFIX}TLS_CERT_FILE", f"{ENV_PREFIX}TLS_KEY_FILE"
    read_pem(files.cert_file, cert_setting, "CERTIFICATE")
    read_pem(files.key_file, key_setting, "PRIVATE KEY")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=files.cert_file)
    except ssl.SSLError:
        raise ConfigError(f"{cert_setting} {files.cert_file} holds no valid certificate") from None
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
    except ssl.SSLError as error:
        raise ConfigError(
            f"{key_setting} {files.key_file} is not a valid private key of the certificate in "
            f"{files.cert_file} ({error.reason or 'rejected'})"
        ) from None
    if files.client_ca_file is not None:
        ca_setting = f"{ENV_PREFIX}TLS_CLIENT_CA_FILE"
        read_pem(files.client_ca_file, ca_setting, "CERTIFICATE")
        try:
            context.load_verify_locations(cafile=files.client_ca_file)
        except ssl.SSLError:
            raise ConfigError(
                f"{ca_setting} {files.client_ca_file} holds no valid certificate"
            ) from None


# Where the router connects: tcp://host:port or ipc://path (a "*" is for binding).
ZmqEndpoint = Annotated[str, Field(pattern=r"^(tcp://[^*\s]+:\d+|ipc://\S+)$")]


class KVEventsConfig(BaseModel):
    """Where a backend publishes its KV cache events (vLLM's ``--kv-events-config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The engine's PUB socket, e.g. tcp://10.0.0.7:5557 (connect, never bind: no "*").
    endpoint: ZmqEndpoint
    # Its replay (ROUTER) socket, for batches a gap says were missed; None: a gap is
    # logged and the events after it are applied as they come.
    replay_endpoint: ZmqEndpoint | None = None
    # Messages of this topic only (a prefix match, as ZMQ subscriptions are); "": all.
    topic: str = ""
    # How the events' blocks become the router's prefix blocks (hashes of prompt
    # bytes): None, the engine's block hashes are the router's own (mock devices);
    # else a byte-level BPE tokenizer.json of the served model, whose vocabulary turns
    # the events' token ids back into prompt bytes (vLLM).
    tokenizer: Path | None = None


BACKEND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class BackendConfig(BaseModel):
    """One backend of the pool file."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(min_length=1, pattern=BACKEND_ID_PATTERN)
    kind: str = "mock"
    address: Address
    role: Role
    model: str = Field(min_length=1)
    profile: str = ""
    # Chips of `profile` one deployment of this backend spans (tensor parallel); the
    # performance model, and a mock device, use it. None: the fewest that hold the model.
    chips: int | None = Field(default=None, ge=1)
    # Mock devices started by `hetero-router up` only: modelled waits times this.
    time_scale: float = Field(default=1.0, ge=0, le=MAX_TIME_SCALE)
    # How KV reaches this backend in a split (or leaves it): "direct", the decode
    # side pulls it; "relay", the router moves it (backends that cannot reach each
    # other). Relay is used when either side of a pair asks for it and both can.
    handoff: Literal["direct", "relay"] = "direct"
    # Settings of this kind of adapter (e.g. an API key's environment variable).
    options: dict[str, Any] = Field(default_factory=dict)
    # The engine's KV cache events feed the prefix index (what it stores and evicts);
    # None: the router's own record of what it sent is all it knows.
    kv_events: KVEventsConfig | None = None


# A DNS name: dot-separated labels of letters, digits and hyphens (a trailing dot allowed).
_DNS_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*\.?$"
# A Kubernetes object name / namespace (RFC 1123 label).
_K8S_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# One label selector requirement: key, key=value, key==value, key!=value, !key,
# key in (a,b), key notin (a,b); keys may have a DNS prefix (hetero-router.io/role).
_SELECTOR_KEY = r"([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
_SELECTOR_VALUE = r"([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?"
_SELECTOR_REQUIREMENT = re.compile(
    rf"\s*(!{_SELECTOR_KEY}|{_SELECTOR_KEY}(\s*(=|==|!=)\s*{_SELECTOR_VALUE})?"
    rf"|{_SELECTOR_KEY}\s+(in|notin)\s*\(\s*{_SELECTOR_VALUE}(\s*,\s*{_SELECTOR_VALUE})*\s*\))\s*"
)


def _matching(pattern: str, what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"not {what}: {value[:64]!r}")
        return value

    return AfterValidator(check)


DnsName = Annotated[str, Field(max_length=254), _matching(_DNS_NAME, "a DNS name")]
K8sName = Annotated[str, _matching(_K8S_NAME, "a Kubernetes name (RFC 1123 label)")]


def _label_selector(selector: str) -> str:
    """``selector`` if it is a Kubernetes label selector; ValueError naming the bad part."""
    for requirement in re.split(r",(?![^()]*\))", selector) if selector.strip() else []:
        if not _SELECTOR_REQUIREMENT.fullmatch(requirement):
            raise ValueError(f"not a label selector requirement: {requirement.strip()!r}")
    return selector


class DnsDiscovery(BaseModel):
    """Backends are the records of a DNS name (a headless Service), re-resolved on an
    interval: A/AAAA give addresses (``port`` says where they listen), SRV gives
    targets and ports."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: DnsName
    record: Literal["A", "AAAA", "SRV"] = "A"
    port: int | None = Field(default=None, ge=1, le=65535)
    interval_s: float = Field(default=10.0, gt=0, le=MAX_SECONDS)
    timeout_s: float = Field(default=2.0, gt=0, le=MAX_SECONDS)
    # host:port of the DNS server to ask; unset: the system's resolvers (/etc/resolv.conf).
    nameserver: Address | None = None

    @model_validator(mode="after")
    def _port_fits_record(self) -> DnsDiscovery:
        if self.record == "SRV" and self.port is not None:
            raise ValueError("port: SRV records carry their own ports; leave it out")
        if self.record != "SRV" and self.port is None:
            raise ValueError(f"port: {self.record} records need the port the backends listen on")
        return self


class EndpointSliceDiscovery(BaseModel):
    """Backends are the ready endpoints of the EndpointSlices (discovery.k8s.io/v1) of a
    Service, or of every Service whose slices match ``label_selector``: listed, then
    watched."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    service: K8sName | None = None
    # Unset: the router's own namespace (in a cluster), else "default".
    namespace: K8sName | None = None
    label_selector: Annotated[str, AfterValidator(_label_selector)] = ""
    # The endpoint port to use, by name; unset: the slice's only (or first) port.
    port_name: str | None = Field(default=None, min_length=1, max_length=63)
    # A kubeconfig file (out of a cluster); unset: the pod's service account.
    kubeconfig: Path | None = None
    # How long one watch request runs before it is made again (the API server's own
    # limit is 30-60 minutes); a broken watch is re-listed after a pause.
    watch_timeout_s: float = Field(default=300.0, gt=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def _selects_something(self) -> EndpointSliceDiscovery:
        if self.service is None and not self.label_selector.strip():
            raise ValueError("name a service, a label_selector, or both")
        return self


class Discovery(BaseModel):
    """Where a pool entry's backends come from: exactly one source."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dns: DnsDiscovery | None = None
    endpointslices: EndpointSliceDiscovery | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Discovery:
        if (self.dns is None) == (self.endpointslices is None):
            raise ValueError("give exactly one of dns, endpointslices")
        return self


class DiscoveredEntry(BaseModel):
    """A pool entry whose backends are discovered: each endpoint found becomes a backend
    of these fields (``id`` its prefix). ``kind``, ``role``, ``model`` and ``profile``
    left out are read from the EndpointSlices' annotations or labels
    (``hetero-router.io/<field>``); DNS has none, so it needs ``role`` and ``model``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=63, pattern=BACKEND_ID_PATTERN)
    discovery: Discovery
    kind: str | None = Field(default=None, min_length=1)
    role: Role | None = None
    model: str | None = Field(default=None, min_length=1)
    profile: str | None = None
    chips: int | None = Field(default=None, ge=1)
    time_scale: float = Field(default=1.0, ge=0, le=MAX_TIME_SCALE)
    handoff: Literal["direct", "relay"] = "direct"
    options: dict[str, Any] = Field(default_factory=dict)
    # Each backend's KV cache events; ``{host}`` in an endpoint is the backend's own
    # host (tcp://{host}:5557: the pod's IP).
    kv_events: KVEventsConfig | None = None

    @model_validator(mode="after")
    def _dns_names_everything(self) -> DiscoveredEntry:
        missing = [f for f in ("role", "model") if getattr(self, f) is None]
        if self.discovery.dns is not None and missing:
            raise ValueError(f"DNS records carry no labels: give {' and '.join(missing)}")
        return self

    def backend(self, suffix: str, address: str, labels: Mapping[str, str]) -> BackendConfig:
        """The backend of one endpoint found: this entry's fields, those it leaves out
        from ``labels`` (``role``, ``kind``, ``model``, ``profile``); ValueError (pydantic's)
        when what they make is not a valid backend."""
        # Every field of the entry but its own id and source is the backend's (a field
        # added to both models carries over); those it leaves out come from the labels.
        fields: dict[str, Any] = {
            name: value
            for name, value in self.model_dump(exclude={"id", "discovery"}).items()
            if value is not None
        }
        for name in LABELLED_FIELDS:
            if name not in fields and name in labels:
                fields[name] = labels[name]
        events = fields.get("kv_events")
        if events is not None:
            host = address.rpartition(":")[0]  # an IPv6 one in brackets, as ZMQ wants it
            for key in ("endpoint", "replay_endpoint"):
                if isinstance(events.get(key), str):
                    events[key] = events[key].replace("{host}", host)
        fields.update(id=f"{self.id}-{suffix}", address=address)
        return BackendConfig.model_validate(fields)


# The fields a discovered entry may leave to its endpoints' labels.
LABELLED_FIELDS = ("role", "kind", "model", "profile")


def _entry_kind(value: Any) -> str:
    if isinstance(value, DiscoveredEntry) or (isinstance(value, dict) and "discovery" in value):
        return "DiscoveredEntry"
    return "BackendConfig"


PoolEntry = Annotated[
    Annotated[BackendConfig, Tag("BackendConfig")]
    | Annotated[DiscoveredEntry, Tag("DiscoveredEntry")],
    Discriminator(_entry_kind),
]


class PoolConfig(BaseModel):
    """The pool file: backends at fixed addresses and entries whose backends are
    discovered. ``backends`` are the fixed ones; ``entries`` all, in the file's order."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    default_model: str = ""
    entries: tuple[PoolEntry, ...] = Field(min_length=1, alias="backends")

    @model_validator(mode="after")
    def _consistent(self) -> PoolConfig:
        ids = [entry.id for entry in self.entries]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"backend ids must be unique, repeated: {', '.join(duplicates)}")
        labelled = any(e.model is None for e in self.discovered)
        if self.default_model and self.default_model not in self.models and not labelled:
            raise ValueError(f"default_model {self.default_model!r} is served by no backend")
        return self

    @property
    def backends(self) -> tuple[BackendConfig, ...]:
        """The backends at fixed addresses."""
        return tuple(e for e in self.entries if isinstance(e, BackendConfig))

    @property
    def discovered(self) -> tuple[DiscoveredEntry, ...]:
        return tuple(e for e in self.entries if isinstance(e, DiscoveredEntry))

    @property
    def models(self) -> list[str]:
        """The models the file names (discovered entries may add more from labels)."""
        return sorted({e.model for e in self.entries if e.model is not None})

    @property
    def resolved_default_model(self) -> str:
        return self.default_model or (self.models[0] if self.models else "")


DEFAULT_POOL_RESOURCE = "defaults/pool.yaml"


def default_pool_path() -> Path:
    return Path(str(resources.files("router").joinpath(DEFAULT_POOL_RESOURCE)))


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path``; ConfigError says which ``what`` file could not be
    read, or why it is no document (not YAML, nested too deeply, too large)."""
    try:
        return read_yaml_file(path, what)
    except DocumentError as error:
        raise ConfigError(str(error)) from None


def load_pool(path: Path | None) -> PoolConfig:
    """Reads and validates a pool file; ConfigError names the file and the field."""
    path = path or default_pool_path()
    return parse_pool(read_yaml(path, "pool"), source=str(path))


def parse_pool(raw: Any, *, source: str = "pool") -> PoolConfig:
    if raw is None:
        raise ConfigError(f"{source}: the file is empty; expected a mapping with a 'backends' list")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'backends' list")
    try:
        return PoolConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {problems(error, PoolConfig)}") from None
