"""The router's adapter for one vLLM OpenAI-compatible server, split with NixlConnector.

The P/D sequence is vLLM's own (its NIXL toy proxy, ``toy_proxy_server.py``), run by
the router's dispatcher, with one request id (header ``X-Request-Id``) on both legs:

1. Prefill: the client's body with ``kv_transfer_params`` asking for a remote decode,
   ``stream: false`` and a one-token limit. The engine computes the prompt's KV, holds
   the blocks for the decode engine to read, and answers with the ``kv_transfer_params``
   naming them (engine id, block ids, host, port, tp size, ...), forwarded opaquely.
2. Decode: the client's body restored (stream, token limit) plus those parameters; the
   decode engine pulls the blocks over NIXL, recomputes the first token and streams.

The engines run with the NixlConnector (``--kv-transfer-config``; the prefill engine
as ``kv_producer``, the decode engine as ``kv_consumer``, see deploy/examples/vllm-pd).
A request without ``kv_transfer_params`` is a plain completion on either, so one
adapter serves both roles and colocated requests (a plain streaming completion).

vLLM has no abort endpoint: it aborts a request when its connection closes, so
``abort`` closes the request's open connections. KV blocks a finished prefill still
holds are freed by the prefill engine itself, when read or when their lease expires.

The context length
------------------
vLLM (0.32) refuses (HTTP 400) a request whose prompt tokens reach its
``max_model_len`` (no room is left for one output token) or whose ``max_tokens`` is
above it; a prompt that fits with fewer than ``max_tokens`` tokens left is served and
stops at the context length (finish reason ``length``). A split request would learn
of a refusal only from its decode leg, after a whole prefill, so the adapter checks
before the first leg it sends: in
``prefill``, and in ``generate`` (colocated); not in ``decode``, whose prefill has
passed the check. The limit is read from ``GET /v1/models`` (its ``max_model_len``)
on every passing health check, which the router runs for each backend during its
start-up before it serves; until a read succeeds it is unknown and nothing is checked.
A failed read keeps the last value.

The check costs no round trip while a cheap upper bound of the prompt's tokens stays
below the limit: the prompt's UTF-8 bytes (byte-level BPE gives at most one token
per byte) and a few special tokens, or for chat every message's role and content
bytes plus an allowance per message and one for the whole template. Beyond that
bound the adapter asks ``POST /tokenize`` (the messages with the chat template
applied) for the exact count, and refuses a request that does not fit with a
:class:`~backends.errors.BackendRejectedError` naming the limit, before any leg. A
failed ``/tokenize`` does not fail the request: it is logged and the leg is sent,
and the engine's own 400 (like every 400, 413 and 422 it answers: INVALID_ARGUMENT,
never retried) is the backstop. The count waits at most 5 s, and its time comes out
of the leg's deadline; an ``abort`` during it sends no leg.

Options (the pool file's ``options`` of a ``kind: vllm`` backend):

``model``
    served model name sent in the body (and to ``/tokenize``), and the ``/v1/models``
    entry whose ``max_model_len`` counts; default: the request's model, and the
    smallest limit listed.
``api_key_env`` / ``api_key_file``
    where to read the bearer token (vLLM's ``--api-key``); an inline ``api_key`` is
    refused, so that no key sits in the pool file. The key is held as a
    :class:`~backends.http_common.Secret` (redacted in every repr) and scrubbed from
    every error message, in case the engine or a proxy in front of it echoes it.
``timeout_connect_s`` (5)
    TCP connect deadline, within each leg's own deadline.
``timeout_idle_s`` (60)
    longest silence allowed between two reads of a stream (queueing included).
``max_connections`` (1024)
    connection pool size; each streaming leg holds one connection.
``return_token_ids`` (false)
    ask the engine for token ids (``return_token_ids``, recent vLLM) so frames carry
    them; off by default because older engines warn on unknown fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeGuard, TypeVar

import aiohttp
import structlog

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import (
    Backend,
    BackendLoad,
    Capabilities,
    GenerationRequest,
    HandoffMode,
    HealthStatus,
    KVHandle,
    PrefillResult,
    Role,
)
from backends.errors import BackendError, BackendRejectedError
from backends.http_common import (
    ExchangeAborted,
    OpenExchanges,
    Sample,
    Secret,
    choice_content,
    client_timeout,
    finish_reason,
    new_session,
    openai_frames,
    parse_prometheus,
    read_api_key,
    reject_inline_key,
    status_error,
    transport_error,
    usage_message,
)

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

T = TypeVar("T")

_DEFAULTS: Mapping[str, Any] = {
    "model": "",
    "api_key_env": "",
    "api_key_file": "",
    "timeout_connect_s": 5.0,
    "timeout_idle_s": 60.0,
    "max_connections": 1024,
    "return_token_ids": False,
}

# The prefill leg's request for a remote decode: vLLM's NixlConnector keys, the remote
# fields left empty for the prefill engine to fill in its answer.
_PREFILL_KV_PARAMS: Mapping[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# An error answer is read this far: enough for any engine message, bounded for a proxy's page.
_ERROR_BODY_BYTES = 64 * 1024

# The cheap upper bound of a prompt's tokens (see the module docstring): what a
# tokenizer adds to a plain prompt (BOS, EOS), and what a chat template adds per
# message besides its role and content (markers, separators) and once (a default
# system prompt, the generation prompt).
_SPECIAL_TOKENS = 8
_TEMPLATE_TOKENS_PER_MESSAGE = 16
_TEMPLATE_TOKENS = 256
# The longest wait for /tokenize, within the leg's deadline: it only counts tokens.
_TOKENIZE_TIMEOUT_S = 5.0

# vLLM validates ``seed`` as a signed 64-bit integer; the router's seeds are unsigned.
_SEED_MASK = (1 << 63) - 1

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # current, before 0.10
_CACHE_CONFIG = "vllm:cache_config_info"
_LOAD_METRICS = frozenset({_RUNNING, _WAITING, *_KV_USAGE, _CACHE_CONFIG})
# Scale of the KV figures when the engine does not expose its capacity in tokens.
KV_USAGE_SCALE = 1000


class VllmBackend(Backend):
    """One vLLM server: prefill, decode and colocated generation over HTTP."""

    def __init__(
        self, backend_id: str, address: str, options: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(backend_id, address, options)
        reject_inline_key(self.options)
        unknown = sorted(set(self.options) - set(_DEFAULTS))
        if unknown:
            known = ", ".join(sorted(_DEFAULTS))
            raise ValueError(f"unknown vllm option(s) {', '.join(unknown)}; known: {known}")
        settings = {**_DEFAULTS, **self.options}
        self._served_model = str(settings["model"])
        self._connect_timeout_s = _positive(settings, "timeout_connect_s")
        self._idle_timeout_s = _positive(settings, "timeout_idle_s")
        self._max_connections = int(_positive(settings, "max_connections"))
        self._return_token_ids = bool(settings["return_token_ids"])
        # Read now so that a missing secret fails at start-up, naming the option.
        self._key = Secret(read_api_key(self.options))
        self._session: aiohttp.ClientSession | None = None
        self._open = OpenExchanges()
        self._max_model_len: int | None = None  # from /v1/models; None: unknown

    def __repr__(self) -> str:
        return f"VllmBackend(id={self.id!r}, address={self.address!r})"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            roles=frozenset({Role.PREFILL, Role.DECODE, Role.BOTH}),
            handoff_modes=frozenset({HandoffMode.SEQUENTIAL}),
        )

    async def start(self) -> None:
        self._session = new_session(
            self.address, api_key=self._key.reveal(), max_connections=self._max_connections
        )

    async def close(self) -> None:
        self._open.abort_all()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def max_model_len(self) -> int | None:
        """The engine's context length as last read from ``/v1/models``; None: unknown."""
        return self._max_model_len

    async def check_health(self, timeout_s: float) -> HealthStatus:
        """``GET /health``; when it passes, the context length is read again, within the
        same deadline (a failed read does not make the engine unhealthy)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with self._client.get("/health", timeout=self._timeout(timeout_s)) as response:
                serving = response.status == 200
                if not serving:
                    body = await response.content.read(_ERROR_BODY_BYTES)
                    error = self._key.scrub(status_error(self.id, response.status, body))
        except (aiohttp.ClientError, TimeoutError) as failure:
            error = self._key.scrub(transport_error(self.id, failure, timeout_s))
            return HealthStatus(
                serving=False, detail=error.message, timed_out=isinstance(failure, TimeoutError)
            )
        if not serving:
            return HealthStatus(serving=False, detail=error.message)
        await self._read_max_model_len(deadline - loop.time())
        return HealthStatus(serving=True)

    async def _read_max_model_len(self, timeout_s: float) -> None:
        """Best effort: on any failure the last value stays."""
        if timeout_s <= 0:
            return
        try:
            async with self._client.get("/v1/models", timeout=self._timeout(timeout_s)) as response:
                if response.status != 200:
                    log.debug("max_model_len not read", backend=self.id, status=response.status)
                    return
                listing = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as failure:
            detail = self._key.clean(str(failure) or type(failure).__name__)
            log.debug("max_model_len not read", backend=self.id, error=detail)
            return
        self._learn_max_model_len(_listed_max_model_len(listing, self._served_model))

    def _learn_max_model_len(self, value: int | None) -> None:
        if value != self._max_model_len:
            log.info("backend context length", backend=self.id, max_model_len=value)
            self._max_model_len = value

    async def load(self, timeout_s: float) -> BackendLoad:
        """Queue depth and KV use from ``/metrics``, summed over the server's engines.

        KV figures are tokens (``num_gpu_blocks * block_size`` from
        ``vllm:cache_config_info``, times ``vllm:kv_cache_usage_perc``) when the engine
        exposes its capacity. Otherwise they are a per-mille scale:
        ``kv_tokens_capacity = KV_USAGE_SCALE`` (1000) and ``kv_tokens_used`` the usage
        fraction times 1000, so ``used / capacity`` is the usage either way. A missing
        gauge counts as 0 (both KV fields 0: unknown).
        """
        try:
            async with self._client.get("/metrics", timeout=self._timeout(timeout_s)) as response:
                body = await response.read()
                if response.status != 200:
                    raise self._key.scrub(status_error(self.id, response.status, body))
        except (aiohttp.ClientError, TimeoutError) as failure:
            raise self._key.scrub(transport_error(self.id, failure, timeout_s)) from None
        samples = parse_prometheus(body.decode("utf-8", errors="replace"), _LOAD_METRICS)
        used, capacity = _kv_tokens(samples)
        return BackendLoad(
            waiting=round(sum(s.value for s in samples.get(_WAITING, ()))),
            running=round(sum(s.value for s in samples.get(_RUNNING, ()))),
            kv_tokens_used=used,
            kv_tokens_capacity=capacity,
        )

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        """Runs the prefill leg; the decode leg recomputes and streams the first token.

        Without ``kv_transfer_params`` in the answer the engine kept no KV for a remote
        decode. If it stopped (EOS or a stop string as the first token: vLLM releases
        the blocks of such a request at once) its answer is the whole completion, and
        the request finishes here with that answer as its only frame. Otherwise (an
        engine started without the NIXL connector) the decode leg is sent without KV
        parameters and the decode engine prefills locally: slower, still correct.
        """
        timeout_s = await self._check_length(request, timeout_s)
        body = {**self._body(request), "kv_transfer_params": dict(_PREFILL_KV_PARAMS)}
        body.update(stream=False, max_tokens=1)  # stream_options / min_tokens never set
        if request.messages:
            body["max_completion_tokens"] = 1
        reply = await self._exchange(request, body, timeout_s)
        usage = usage_message(reply.get("usage") or {})
        kv_params = reply.get("kv_transfer_params")
        if isinstance(kv_params, dict) and kv_params:
            handle = KVHandle(self.id, request.request_id, transport_params=kv_params)
            return PrefillResult(b"", -1, usage.prompt_tokens, finished=False, handle=handle)
        choice = (reply.get("choices") or [{}])[0]
        if isinstance(choice, dict) and choice.get("finish_reason") == "stop":
            text, token_ids = choice_content(choice)
            answer = router_pb2.GenerateResponse(
                text=text,
                token_ids=token_ids,
                finish_reason=finish_reason("stop"),
                usage=usage,
            )
            frame = answer.SerializeToString()
            return PrefillResult(frame, -1, usage.prompt_tokens, finished=True, handle=None)
        log.info("prefill answer has no kv_transfer_params; decode will prefill", backend=self.id)
        handle = KVHandle(self.id, request.request_id, transport_params={})
        return PrefillResult(b"", -1, usage.prompt_tokens, finished=False, handle=handle)

    def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        body = self._streaming_body(request)
        if handle.transport_params:
            body["kv_transfer_params"] = dict(handle.transport_params)
        return self._stream(request, body, timeout_s)

    def generate(self, request: GenerationRequest, timeout_s: float) -> AsyncGenerator[bytes, None]:
        return self._stream(request, self._streaming_body(request), timeout_s, check_length=True)

    async def abort(self, request_id: str, timeout_s: float) -> None:
        # Closing the connection is vLLM's abort; it needs no round trip to wait for.
        self._open.abort(request_id)

    @property
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"backend {self.id}: start() first")
        return self._session

    def _timeout(self, timeout_s: float, idle_s: float | None = None) -> aiohttp.ClientTimeout:
        return client_timeout(timeout_s, self._connect_timeout_s, idle_s)

    def _prompt_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The model and the prompt (or messages): what a leg and ``/tokenize`` both send."""
        body: dict[str, Any] = {"model": self._served_model or request.model}
        if request.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt
        return body

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body = self._prompt_body(request)
        body.update(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed & _SEED_MASK,
            stop=list(sampling.stop),
        )
        if self._return_token_ids:
            body["return_token_ids"] = True
        return body

    def _streaming_body(self, request: GenerationRequest) -> dict[str, Any]:
        # include_usage makes the engine send a last chunk with the token counts.
        return {**self._body(request), "stream": True, "stream_options": {"include_usage": True}}

    def _path(self, request: GenerationRequest) -> str:
        return "/v1/chat/completions" if request.messages else "/v1/completions"

    def _headers(self, request: GenerationRequest) -> dict[str, str]:
        # vLLM takes the request id from this header, so both legs and the engines'
        # logs share the router's id.
        return {"X-Request-Id": request.request_id}

    async def _post(
        self, request: GenerationRequest, body: Mapping[str, Any], deadlines: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """POSTs one leg; returns the response once the engine has accepted it (2xx)."""
        response = await self._client.post(
            self._path(request), json=body, headers=self._headers(request), timeout=deadlines
        )
        if 200 <= response.status < 300:
            return response
        try:
            payload = await response.content.read(_ERROR_BODY_BYTES)
        finally:
            response.release()
        raise self._key.scrub(status_error(self.id, response.status, payload))

    async def _abortable(
        self,
        request: GenerationRequest,
        work: Awaitable[T],
        timeout_s: float,
        discard: Callable[[T], None] | None = None,
    ) -> T:
        """Awaits one exchange so that abort() can stop it; errors become BackendError."""
        try:
            return await self._open.run(request.request_id, work, discard=discard)
        except ExchangeAborted:
            raise self._aborted(request) from None
        except (aiohttp.ClientError, TimeoutError) as failure:
            raise self._key.scrub(transport_error(self.id, failure, timeout_s)) from None

    async def _exchange(
        self, request: GenerationRequest, body: Mapping[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """Runs a non-streaming leg and returns its JSON answer."""

        async def post_and_read() -> bytes:
            async with await self._post(request, body, self._timeout(timeout_s)) as response:
                return await response.read()

        payload = await self._abortable(request, post_and_read(), timeout_s)
        try:
            reply = json.loads(payload)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise BackendError(self.id, f"malformed answer: {payload[:80]!r}")
        return reply

    async def _check_length(self, request: GenerationRequest, timeout_s: float) -> float:
        """Refuses a request the engine's context cannot hold (see the module docstring);
        returns what is left of the leg's deadline ``timeout_s``."""
        limit = self._max_model_len
        max_tokens = request.sampling.max_tokens
        if limit is not None and max_tokens > limit:
            raise BackendRejectedError(self.id, f"max_tokens {max_tokens} > max_model_len {limit}")
        if limit is None or _fits(_prompt_token_bound(request), limit):
            return timeout_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        tokens = await self._count_tokens(request, min(timeout_s, _TOKENIZE_TIMEOUT_S))
        limit = self._max_model_len  # the count's answer may have refreshed it
        if tokens is not None and limit is not None and not _fits(tokens, limit):
            raise BackendRejectedError(
                self.id,
                f"prompt is {tokens} tokens, max_model_len is {limit}: no room for an output token",
            )
        left = timeout_s - (loop.time() - started)
        if left <= 0:
            raise transport_error(self.id, TimeoutError(), timeout_s)
        return left

    async def _count_tokens(self, request: GenerationRequest, timeout_s: float) -> int | None:
        """The prompt's tokens by ``POST /tokenize``; None (logged) when it cannot say."""
        try:
            status, payload = await self._open.run(
                request.request_id, self._tokenize(request, timeout_s)
            )
        except ExchangeAborted:
            raise self._aborted(request) from None
        except (aiohttp.ClientError, TimeoutError) as failure:
            problem = transport_error(self.id, failure, timeout_s).message
        else:
            reply = _json_object(payload) if status == 200 else None
            count = reply.get("count") if reply is not None else None
            if _is_count(count):
                limit = reply.get("max_model_len") if reply is not None else None
                if _is_count(limit) and limit > 0:
                    self._learn_max_model_len(limit)
                return count
            problem = (
                status_error(self.id, status, payload).message
                if status != 200
                else f"malformed /tokenize answer: {payload[:80]!r}"
            )
        log.warning(
            "prompt not counted; the leg is sent unchecked",
            backend=self.id,
            request=request.request_id,
            error=self._key.clean(problem),
        )
        return None

    async def _tokenize(self, request: GenerationRequest, timeout_s: float) -> tuple[int, bytes]:
        body = self._prompt_body(request)
        deadlines = self._timeout(timeout_s)
        async with self._client.post("/tokenize", json=body, timeout=deadlines) as response:
            return response.status, await response.read()

    async def _stream(
        self,
        request: GenerationRequest,
        body: Mapping[str, Any],
        timeout_s: float,
        *,
        check_length: bool = False,
    ) -> AsyncGenerator[bytes, None]:
        if check_length:
            timeout_s = await self._check_length(request, timeout_s)
        post = self._post(request, body, self._timeout(timeout_s, self._idle_timeout_s))
        response = await self._abortable(request, post, timeout_s, discard=_close)
        aborted = False

        def abort() -> None:
            nonlocal aborted
            aborted = True
            response.close()

        complete = False
        try:
            with self._open.track(request.request_id, abort):
                async with contextlib.aclosing(openai_frames(self.id, response)) as frames:
                    async for frame in frames:
                        yield frame
            complete = True
        except (aiohttp.ClientError, TimeoutError, ValueError, BackendError) as failure:
            raise self._stream_error(request, failure, timeout_s, aborted) from None
        finally:
            # A finished stream hands its connection back to the pool; any other exit
            # (an error, abort, or the consumer leaving early) closes it, and closing
            # the connection is what makes vLLM abort the request.
            if complete:
                response.release()
            else:
                response.close()

    def _stream_error(
        self, request: GenerationRequest, failure: Exception, timeout_s: float, aborted: bool
    ) -> BackendError:
        if aborted:  # whatever closing the connection made the read raise
            return self._aborted(request)
        if isinstance(failure, BackendError):
            return self._key.scrub(failure)
        if isinstance(failure, ValueError):
            return BackendError(self.id, f"malformed stream: {failure}")
        return self._key.scrub(transport_error(self.id, failure, timeout_s))

    def _aborted(self, request: GenerationRequest) -> BackendError:
        return BackendError(self.id, f"request {request.request_id} aborted", retryable=False)


def _close(response: aiohttp.ClientResponse) -> None:
    response.close()


def _prompt_token_bound(request: GenerationRequest) -> int:
    """At least as many tokens as the engine will count for the request's prompt, with no
    tokenizer: byte-level BPE (and SentencePiece with byte fallback) makes at most one
    token per UTF-8 byte; the allowances cover special tokens and the chat template."""
    if not request.messages:
        return len(request.prompt.encode()) + _SPECIAL_TOKENS
    per_message = (
        len(m.role.encode()) + len(m.content.encode()) + _TEMPLATE_TOKENS_PER_MESSAGE
        for m in request.messages
    )
    return sum(per_message) + _TEMPLATE_TOKENS


def _fits(prompt_tokens: int, max_model_len: int) -> bool:
    """vLLM's own rule: the prompt leaves room for one output token."""
    return prompt_tokens < max_model_len


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _listed_max_model_len(listing: Any, served_model: str) -> int | None:
    """``max_model_len`` of a ``/v1/models`` listing: the served model's entry if it is
    listed, else the smallest (aliases and LoRA adapters of one engine share it)."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        return None
    limits: dict[str, int] = {}
    for entry in entries:
        limit = entry.get("max_model_len") if isinstance(entry, dict) else None
        if _is_count(limit) and limit > 0:
            limits[str(entry.get("id"))] = limit
    if served_model in limits:
        return limits[served_model]
    return min(limits.values(), default=None)


def _positive(settings: Mapping[str, Any], name: str) -> float:
    try:
        value = float(settings[name])
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {settings[name]!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value:g}")
    return value


def _kv_tokens(samples: Mapping[str, list[Sample]]) -> tuple[int, int]:
    """(used, capacity) of the server's KV caches; see ``VllmBackend.load``."""
    usage_samples = next((samples[name] for name in _KV_USAGE if samples.get(name)), [])
    if not usage_samples:
        return 0, 0
    usage = {s.labels.get("engine", ""): s.value for s in usage_samples}
    capacity = {
        s.labels.get("engine", ""): _capacity_tokens(s.labels)
        for s in samples.get(_CACHE_CONFIG, ())
    }
    if all(capacity.get(engine) for engine in usage):
        used = sum(fraction * capacity[engine] for engine, fraction in usage.items())
        return round(used), sum(capacity[engine] for engine in usage)
    mean = sum(usage.values()) / len(usage)
    return round(mean * KV_USAGE_SCALE), KV_USAGE_SCALE


def _capacity_tokens(labels: Mapping[str, str]) -> int:
    """KV capacity of one engine in tokens, 0 when unknown (blocks are "None" until
    the engine has profiled its memory)."""
    blocks, block_size = labels.get("num_gpu_blocks", ""), labels.get("block_size", "")
    if blocks.isdigit() and block_size.isdigit():
        return int(blocks) * int(block_size)
    return 0
