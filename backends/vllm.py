"""The router's adapter for one vLLM OpenAI-compatible server, split with NixlConnector.

The P/D sequence is vLLM's own (its NIXL toy proxy, ``toy_proxy_server.py``), run by
the router's dispatcher, with one request id (header ``X-Request-Id``) on both legs:

1. Prefill: the client's body with ``kv_transfer_params`` asking for a remote decode,
   ``stream: false`` and a one-token limit. The engine computes the prompt's KV, holds
   the blocks for the decode engine to read, and answers with the ``kv_transfer_params``
   naming them (engine id, block ids, host, port, tp size, ...), forwarded opaquely.
2. Decode: the client's body restored (stream, token limit) plus those parameters; the
   decode engine pulls the blocks over NIXL, recomputes the first token and streams.

The engines run with ``--kv-transfer-config '{"kv_connector":"NixlConnector",
"kv_role":"kv_both"}'``; every instance can take either leg, so one adapter serves both
roles and colocated requests (a plain streaming completion).

vLLM has no abort endpoint: it aborts a request when its connection closes, so
``abort`` closes the request's open connections. KV blocks a finished prefill still
holds are freed by the prefill engine itself, when read or when their lease expires.

Options (the pool file's ``options`` of a ``kind: vllm`` backend):

``model``
    served model name sent in the body; default: the request's model.
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

import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

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
from backends.errors import BackendError
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

    async def check_health(self, timeout_s: float) -> HealthStatus:
        try:
            async with self._client.get("/health", timeout=self._timeout(timeout_s)) as response:
                if response.status == 200:
                    return HealthStatus(serving=True)
                body = await response.content.read(_ERROR_BODY_BYTES)
                error = self._key.scrub(status_error(self.id, response.status, body))
        except (aiohttp.ClientError, TimeoutError) as failure:
            error = self._key.scrub(transport_error(self.id, failure, timeout_s))
            return HealthStatus(
                serving=False, detail=error.message, timed_out=isinstance(failure, TimeoutError)
            )
        return HealthStatus(serving=False, detail=error.message)

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
        return self._stream(request, self._streaming_body(request), timeout_s)

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

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {"model": self._served_model or request.model}
        if request.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt
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

    async def _stream(
        self, request: GenerationRequest, body: Mapping[str, Any], timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
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
