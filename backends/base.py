"""The Backend ABC every adapter implements, and the values that cross it.

The router core talks only to this interface. Token frames cross it as bytes
already encoded as the front door's ``GenerateResponse`` message, so the router
forwards them to the client without decoding them.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.transfer import KVTransfer


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def can_prefill(self) -> bool:
        return self in (Role.PREFILL, Role.BOTH)

    def can_decode(self) -> bool:
        return self in (Role.DECODE, Role.BOTH)


class HandoffMode(enum.StrEnum):
    SEQUENTIAL = "sequential"  # prefill, then decode pulls the KV (vLLM with NIXL)
    CONCURRENT = "concurrent"  # both legs at once, meeting at a bootstrap room (SGLang)
    RELAY = "relay"  # the router moves the KV between the two
    NONE = "none"  # colocated only


@dataclass(frozen=True)
class Capabilities:
    roles: frozenset[Role]
    handoff_modes: frozenset[HandoffMode]
    # ``generate`` continues a sequence from ``GenerationRequest.generated_ids`` (the
    # router resumes a stream whose backend failed mid-way on such a backend).
    resume: bool = False


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant", ...
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: every field is within limits and the seed is fixed.

    ``request_id`` is the router's own, unique among requests in flight: it is the
    only id a backend ever sees, so that no client can name (and so abort or read)
    another's work by sending the same id. ``client_request_id`` is the id the client
    sent, or ``request_id`` when it sent none; logs, response headers and the Route
    message show it.
    """

    request_id: str
    model: str
    prompt: str
    sampling: SamplingParams
    prompt_tokens: int  # estimate, for scheduling
    # Set for chat requests. ``prompt`` then holds the router's own chat template
    # rendering (what mock devices read); engine adapters send the messages and
    # let the engine apply the model's template.
    messages: tuple[ChatMessage, ...] = ()
    # A resumed request: the tokens its client already has, in order. The sequence
    # is the prompt followed by them, the token at sampling position
    # ``len(generated_ids)`` comes next, ``sampling.max_tokens`` counts only the
    # tokens still to come, and stop strings see the text of these tokens too.
    # Frames carry only the new tokens; usage may count the resumed tokens as
    # prompt, as an engine given them as its prompt does: the router rewrites the
    # last frame's usage for the whole request. Sent only to backends whose
    # capabilities say ``resume``.
    generated_ids: tuple[int, ...] = ()
    client_request_id: str = ""
    # W3C trace context (``traceparent``) for the backends: the client's, or the
    # router's own span when tracing is on; empty when there is none. ``tracestate``
    # is the client's, passed on with it.
    traceparent: str = ""
    tracestate: str = ""

    def trace_headers(self) -> dict[str, str]:
        """The W3C trace context headers an HTTP adapter sends the engine (none without)."""
        if not self.traceparent:
            return {}
        if not self.tracestate:
            return {"traceparent": self.traceparent}
        return {"traceparent": self.traceparent, "tracestate": self.tracestate}

    @property
    def shown_id(self) -> str:
        """The id a client knows the request by."""
        return self.client_request_id or self.request_id

    def resumed_after(self, token_ids: Sequence[int]) -> GenerationRequest:
        """This request continued after ``token_ids`` (the tokens the client has, the
        first ones of this request when it is itself resumed): what a backend that can
        resume is sent."""
        left = self.sampling.max_tokens - len(token_ids) + len(self.generated_ids)
        return replace(
            self,
            generated_ids=tuple(token_ids),
            sampling=replace(self.sampling, max_tokens=left),
        )


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    tensor_parallel: int

    def describe(self) -> str:
        return (
            f"layers={self.layers} kv_heads={self.kv_heads} head_dim={self.head_dim} "
            f"dtype={self.dtype} block_size={self.block_size} tp={self.tensor_parallel}"
        )


@dataclass(frozen=True)
class KVHandle:
    """Where a prefilled KV cache lives and how to read it.

    Device servers fill the layout and byte fields; every transport (the mock devices'
    data plane, vLLM's ``kv_transfer_params``, SGLang's bootstrap room) carries what it
    needs to find the bytes in ``transport_params``, opaque to the router.
    """

    backend_id: str
    request_id: str
    address: str = ""
    layout: KVLayout | None = None
    num_tokens: int = 0
    byte_length: int = 0
    checksum: int = 0
    lease_expires_at: float = 0.0
    block_ids: tuple[int, ...] = ()
    # repr=False: it may hold a lease token, which must not reach a log line.
    transport_params: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class PrefillResult:
    # Encoded GenerateResponse carrying the first token, streamed to the client at
    # once; empty when the prefill leg yields no token to show (engines whose
    # decode leg recomputes it), and decode then streams from the first token.
    first_frame: bytes
    first_token_id: int
    prompt_tokens: int
    finished: bool  # the first token ended the request; handle is None then
    handle: KVHandle | None


@dataclass(frozen=True)
class BackendLoad:
    waiting: int = 0
    running: int = 0
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 0
    kv_leases: int = 0
    cached_prefix_hashes: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class HealthStatus:
    serving: bool
    detail: str = ""
    model: str = ""
    profile: str = ""
    layout: KVLayout | None = None
    # The check got no answer in time (a busy backend), rather than a refusal or an error.
    timed_out: bool = False


class Backend(abc.ABC):
    """One prefill, decode or colocated endpoint."""

    def __init__(
        self, backend_id: str, address: str, options: Mapping[str, Any] | None = None
    ) -> None:
        """``options`` are the pool file's kind-specific settings for this backend."""
        self.id = backend_id
        self.address = address
        self.options: Mapping[str, Any] = options or {}

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    async def start(self) -> None:
        """Opens connections; must not wait for the backend to be up."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def check_health(self, timeout_s: float) -> HealthStatus: ...

    @abc.abstractmethod
    async def load(self, timeout_s: float) -> BackendLoad: ...

    @abc.abstractmethod
    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        """Computes the KV of the prompt and the first token; the KV stays leased."""

    @abc.abstractmethod
    def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        """Pulls the KV named by the handle and streams the frames after the first token."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest, timeout_s: float) -> AsyncGenerator[bytes, None]:
        """Prefill and decode on this backend alone; streams every frame."""

    @abc.abstractmethod
    async def abort(self, request_id: str, timeout_s: float) -> None:
        """Stops the request and frees what it holds; unknown ids are not an error."""

    @property
    def kv_transfer(self) -> KVTransfer | None:
        """How the router reads and writes this backend's KV (HandoffMode.RELAY); None
        when it cannot."""
        return None
