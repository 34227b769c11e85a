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
``return_token_ids`` (true)
    ask the engine for token ids (``return_token_ids``, vLLM 0.10.2 and later) so
    frames carry them: the router counts tokens by them, and resumes only streams
    whose ids it has (``Capabilities.resume`` follows this option). vLLM then echoes
    the prompt's ids in a stream's first event (about 7 bytes a token, which the
    router parses); turn it off for an older engine, which warns on the field.

What the engine answers
-----------------------
Every field read from an answer is type-checked, and a reply of the wrong shape
(``choices`` not a list, a token id that is not one, a usage count that is a list)
is a retryable :class:`~backends.errors.BackendError` quoting its start. A stream
event may be at most ``MAX_EVENT_BYTES`` (1 MiB) and a one-token answer at most
``MAX_BODY_BYTES`` (1 MiB), each plus ``ID_BYTES`` (12) per prompt token when the
prompt's ids are echoed; listings, metrics pages and token lists at most
``MAX_PAGE_BYTES`` (16 MiB) (all in :mod:`backends.http_common`). Past that the leg
fails rather than buffer more.

Resume
------
A request with ``generated_ids`` (the router resuming a stream whose backend failed
after those tokens) is sent to ``/v1/completions`` as token ids: the prompt's own ids
from ``POST /tokenize`` (for chat, the messages with the chat template and its
generation prompt, which is what the chat endpoint generates from) followed by the
generated ids, with ``max_tokens`` the tokens still to come. The engine's
detokenizer, primed with that prompt, makes the same text for the new tokens as an
uninterrupted run. Under greedy decoding the output is exactly that run's; a seeded
sample draws afresh from the resume on (vLLM seeds a request's generator at its
start). Usage counts the generated ids as prompt tokens, as the engine does (the
router takes them off and counts them as completion tokens). ``prefill`` and
``decode`` take no ``generated_ids``: a resumed request runs colocated.

A cut can fall inside a character (its UTF-8 bytes split across tokens, or a stray
byte): the interrupted stream held that token's text back, and the resumed one must
begin with it. vLLM 0.32's detokenizer, primed with a token-id prompt whose text ends
that way, sends the whole sequence's text (the prompt too) with its first new token;
the adapter reads the sequence's text (``POST /detokenize``, on every resume) and, when
it ends incomplete, makes the first text from the ids so far instead.

Stop strings are applied by the adapter, not the engine, on a resumed request: the
engine would not see a stop string that begins in the text before the resume. The
adapter reads that text (``POST /detokenize``) and holds text back as vLLM does (the
longest stop string less one character), so the characters the interrupted stream
held back go out first and a stop string across the boundary ends the stream with
finish ``stop``, cut before it. This assumes the interrupted stream came from a vLLM
engine (another engine may hold back a different amount).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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
    ID_BYTES,
    MAX_BODY_BYTES,
    MAX_EVENT_BYTES,
    MAX_PAGE_BYTES,
    ExchangeAborted,
    OpenExchanges,
    Sample,
    Secret,
    ShapeError,
    asked_max_tokens,
    choice_content,
    choice_finish,
    client_timeout,
    field_ids,
    field_object,
    field_text,
    finish_reason,
    first_choice,
    json_object,
    malformed,
    new_session,
    openai_frames,
    parse_json,
    parse_prometheus,
    read_api_key,
    read_body,
    reject_inline_key,
    status_error,
    transport_error,
    usage_message,
)
from backends.tls import client_tls

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

T = TypeVar("T")

_DEFAULTS: Mapping[str, Any] = {
    "model": "",
    "api_key_env": "",
    "api_key_file": "",
    "timeout_connect_s": 5.0,
    "timeout_idle_s": 60.0,
    "max_connections": 1024,
    "return_token_ids": True,
    "tls": None,  # see backends.tls
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
# What a decoded text ends with where its last bytes are an incomplete UTF-8 character.
_INCOMPLETE = "\ufffd"

# vLLM validates ``seed`` as a signed 64-bit integer; the router's seeds are unsigned.
_SEED_MASK = (1 << 63) - 1

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # current, before 0.10
_CACHE_CONFIG = "vllm:cache_config_info"
_LOAD_METRICS = frozenset({_RUNNING, _WAITING, *_KV_USAGE, _CACHE_CONFIG})
# Scale of the KV figures when the engine does not expose its capacity in tokens.
KV_USAGE_SCALE = 1000
# A block count or size in a label: far more digits than any cache has blocks.
_MAX_LABEL_DIGITS = 18


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
        self._tls = client_tls(self.options)  # files read now, like the key
        self._session: aiohttp.ClientSession | None = None
        self._open = OpenExchanges()
        self._max_model_len: int | None = None  # from /v1/models; None: unknown

    def __repr__(self) -> str:
        return f"VllmBackend(id={self.id!r}, address={self.address!r})"

    @property
    def capabilities(self) -> Capabilities:
        # The router resumes a stream from the token ids its frames carried: only
        # frames with ids can be resumed, and a resumed stream must carry them too.
        return Capabilities(
            roles=frozenset({Role.PREFILL, Role.DECODE, Role.BOTH}),
            handoff_modes=frozenset({HandoffMode.SEQUENTIAL}),
            resume=self._return_token_ids,
        )

    async def start(self) -> None:
        self._session = new_session(
            self.address,
            api_key=self._key.reveal(),
            max_connections=self._max_connections,
            tls=self._tls,
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
            error = self._key.scrub(transport_error(self.id, failure, timeout_s, self._tls))
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
                body = await read_body(self.id, response, MAX_PAGE_BYTES, "/v1/models listing")
            listing = parse_json(body)
        except (aiohttp.ClientError, TimeoutError, ShapeError, BackendError) as failure:
            detail = self._key.clean(str(failure) or type(failure).__name__)
            log.debug("max_model_len not read", backend=self.id, error=detail)
            return
        self._learn_max_model_len(listed_max_model_len(listing, self._served_model))

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
                if response.status != 200:
                    body = await response.content.read(_ERROR_BODY_BYTES)
                    raise self._key.scrub(status_error(self.id, response.status, body))
                body = await read_body(self.id, response, MAX_PAGE_BYTES, "metrics page")
        except (aiohttp.ClientError, TimeoutError) as failure:
            raise self._key.scrub(transport_error(self.id, failure, timeout_s)) from None
        return metrics_load(body.decode("utf-8", errors="replace"))

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        """Runs the prefill leg; the decode leg recomputes and streams the first token.

        Without ``kv_transfer_params`` in the answer the engine kept no KV for a remote
        decode. If it stopped (EOS or a stop string as the first token: vLLM releases
        the blocks of such a request at once) its answer is the whole completion, and
        the request finishes here with that answer as its only frame. Otherwise (an
        engine started without the NIXL connector) the decode leg is sent without KV
        parameters and the decode engine prefills locally: slower, still correct.
        """
        _refuse_resume_in_a_split(self.id, request)
        timeout_s = await self._check_length(request, timeout_s)
        body = {**self._body(request), "kv_transfer_params": dict(_PREFILL_KV_PARAMS)}
        body.update(stream=False, max_tokens=1)  # stream_options / min_tokens never set
        if request.messages:
            body["max_completion_tokens"] = 1
        payload = await self._exchange(request, body, timeout_s)
        result = prefill_answer(self.id, request.request_id, payload)
        if result.handle is not None and not result.handle.transport_params:
            log.info(
                "prefill answer has no kv_transfer_params; decode will prefill", backend=self.id
            )
        return result

    def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        _refuse_resume_in_a_split(self.id, request)
        body = self._streaming_body(request)
        if handle.transport_params:
            body["kv_transfer_params"] = dict(handle.transport_params)
        return self._stream(request, body, timeout_s)

    def generate(self, request: GenerationRequest, timeout_s: float) -> AsyncGenerator[bytes, None]:
        if request.generated_ids:
            return self._resume(request, timeout_s)
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
        # logs share the router's id; its spans (--otlp-traces-endpoint) join the
        # request's trace through traceparent.
        return {"X-Request-Id": request.request_id, **request.trace_headers()}

    async def _post(
        self,
        request: GenerationRequest,
        body: Mapping[str, Any],
        deadlines: aiohttp.ClientTimeout,
        path: str | None = None,
    ) -> aiohttp.ClientResponse:
        """POSTs one leg; returns the response once the engine has accepted it (2xx)."""
        response = await self._client.post(
            path or self._path(request),
            json=body,
            headers=self._headers(request),
            timeout=deadlines,
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
    ) -> bytes:
        """Runs a non-streaming leg and returns its answer's body, bounded."""
        limit = MAX_BODY_BYTES + self._echo_bytes(_prompt_token_bound(request))

        async def post_and_read() -> bytes:
            async with await self._post(request, body, self._timeout(timeout_s)) as response:
                return await read_body(self.id, response, limit)

        return await self._abortable(request, post_and_read(), timeout_s)

    def _echo_bytes(self, prompt_tokens: int) -> int:
        """How much longer than usual an answer may be: with ``return_token_ids`` vLLM
        echoes the prompt's ids (in the first event of a stream)."""
        return ID_BYTES * prompt_tokens if self._return_token_ids else 0

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
        except BackendError as failure:  # an answer over the size limit
            problem = failure.message
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
        """``POST /tokenize`` of the prompt, or of the messages with the chat template and
        its generation prompt applied (what the chat endpoint does before it generates)."""
        body = self._prompt_body(request)
        if request.messages:
            body["add_generation_prompt"] = True
        deadlines = self._timeout(timeout_s)
        async with self._client.post("/tokenize", json=body, timeout=deadlines) as response:
            if response.status != 200:
                return response.status, await response.content.read(_ERROR_BODY_BYTES)
            return response.status, await read_body(self.id, response, MAX_PAGE_BYTES)

    async def _detokenize(
        self, request: GenerationRequest, token_ids: list[int], timeout_s: float
    ) -> str:
        """``POST /detokenize``: the text of ``token_ids``; BackendError when it fails."""

        async def post_and_read() -> bytes:
            body = {"model": self._served_model or request.model, "tokens": token_ids}
            deadlines = self._timeout(timeout_s)
            async with self._client.post("/detokenize", json=body, timeout=deadlines) as response:
                if response.status != 200:
                    payload = await response.content.read(_ERROR_BODY_BYTES)
                    raise self._key.scrub(status_error(self.id, response.status, payload))
                return await read_body(self.id, response, MAX_PAGE_BYTES)

        payload = await self._abortable(request, post_and_read(), timeout_s)
        try:
            return field_text(json_object(payload).get("prompt"), "prompt")
        except ShapeError as problem:
            raise malformed(self.id, "/detokenize answer", problem, payload) from None

    # --- resume -------------------------------------------------------------------------

    async def _resume(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        """Continues a sequence from ``request.generated_ids`` (see the module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        generated = list(request.generated_ids)
        prompt_ids = await self._prompt_ids(request, timeout_s)
        sequence = [*prompt_ids, *generated]
        self._check_resumed_length(request, len(sequence))
        stops = tuple(stop for stop in request.sampling.stop if stop)
        # The text of the resumed sequence tells whether the cut split a character (it
        # ends incomplete, U+FFFD); with stop strings, the generated part is read too.
        if stops:
            resumed_text, prior_text = await self._generated_text(
                request, prompt_ids, generated, deadline - loop.time()
            )
        else:
            resumed_text = await self._detokenize(request, sequence, deadline - loop.time())
        body = {**self._body(request), "prompt": sequence}
        body.pop("messages", None)
        body.pop("stop", None)  # checked here, over the text before the resume too
        body.update(stream=True, stream_options={"include_usage": True})
        left = deadline - loop.time()
        if left <= 0:
            raise transport_error(self.id, TimeoutError(), timeout_s)
        frames = self._stream(
            request,
            body,
            left,
            path="/v1/completions",
            prompt_tokens=len(sequence),
            # The stop strings are matched here token by token: a frame of several
            # tokens would end with ids past the one that completes the match.
            merge=not stops,
        )
        if resumed_text.endswith(_INCOMPLETE):
            frames = self._completing_the_cut_character(
                request,
                frames,
                sequence,
                resumed_text.rstrip(_INCOMPLETE),
                deadline=deadline,
                timeout_s=timeout_s,
            )
        if stops:
            # The interrupted stream held back an incomplete character's bytes (vLLM
            # sends no text that ends in one): the stream after the resume completes it.
            prior_text = prior_text.rstrip(_INCOMPLETE)
            frames = _stopped_across_resume(frames, stops, prior_text, len(sequence))
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def _prompt_ids(self, request: GenerationRequest, timeout_s: float) -> list[int]:
        """The prompt's token ids as the engine's own endpoint would make them."""
        status, payload = await self._abortable(
            request, self._tokenize(request, timeout_s), timeout_s
        )
        if status != 200:
            raise self._key.scrub(status_error(self.id, status, payload))
        try:
            return field_ids(json_object(payload).get("tokens"), "tokens")
        except ShapeError as problem:
            raise malformed(self.id, "/tokenize answer", problem, payload) from None

    def _check_resumed_length(self, request: GenerationRequest, tokens: int) -> None:
        limit = self._max_model_len
        max_tokens = request.sampling.max_tokens
        if limit is not None and max_tokens > limit:
            raise BackendRejectedError(self.id, f"max_tokens {max_tokens} > max_model_len {limit}")
        if limit is not None and not _fits(tokens, limit):
            raise BackendRejectedError(
                self.id,
                f"prompt and generated tokens are {tokens}, max_model_len is {limit}: "
                "no room for another token",
            )

    async def _generated_text(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        generated: list[int],
        timeout_s: float,
    ) -> tuple[str, str]:
        """The text of the prompt and generated tokens, and of the generated ones as the
        engine's incremental detokenizer made it: decoded after the prompt (a token's
        leading space depends on what precedes it)."""
        prompt_text, whole = await asyncio.gather(
            self._detokenize(request, prompt_ids, timeout_s),
            self._detokenize(request, [*prompt_ids, *generated], timeout_s),
        )
        if whole.startswith(prompt_text):
            return whole, whole[len(prompt_text) :]
        return whole, await self._detokenize(request, generated, timeout_s)

    async def _completing_the_cut_character(
        self,
        request: GenerationRequest,
        frames: AsyncGenerator[bytes, None],
        sequence: list[int],
        before: str,
        *,
        deadline: float,
        timeout_s: float,
    ) -> AsyncGenerator[bytes, None]:
        """The frames of a stream resumed after a token that left a character incomplete
        (``before``: the sequence's text without it), with the first text the one the
        uninterrupted stream had: that character, completed, and what follows.

        vLLM 0.32, given a token-id prompt whose text ends in an incomplete character,
        sends as its first text the whole sequence's (the prompt included) with the new
        one. The first text is made here instead, from ``POST /detokenize`` of the
        sequence and the ids so far; an engine that gets it right sends the same. Where
        the two differ other than by that echo (a special token among the new ids, which
        the engine leaves out of its text), the engine's text goes out as it came.
        """
        new: list[int] = []
        async with contextlib.aclosing(frames):
            async for raw in frames:
                frame = router_pb2.GenerateResponse.FromString(raw)
                new.extend(frame.token_ids)
                if not frame.text:
                    yield raw
                    continue
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise transport_error(self.id, TimeoutError(), timeout_s)
                whole = await self._detokenize(request, [*sequence, *new], left)
                if whole.startswith(before):
                    first = whole[len(before) :]
                    if not frame.finish_reason:  # held back, as the engine holds it
                        first = first.rstrip(_INCOMPLETE)
                    if first and frame.text.endswith(first):
                        frame.text = first
                yield frame.SerializeToString()
                async for rest in frames:
                    yield rest
                return

    async def _stream(
        self,
        request: GenerationRequest,
        body: Mapping[str, Any],
        timeout_s: float,
        *,
        check_length: bool = False,
        path: str | None = None,
        prompt_tokens: int | None = None,
        merge: bool = True,
    ) -> AsyncGenerator[bytes, None]:
        """Streams one leg; ``prompt_tokens`` (default: the prompt's byte bound) sizes the
        largest event accepted; ``merge=False``: a frame per token event, not per read."""
        if check_length:
            timeout_s = await self._check_length(request, timeout_s)
        deadlines = self._timeout(timeout_s, self._idle_timeout_s)
        post = self._post(request, body, deadlines, path)
        response = await self._abortable(request, post, timeout_s, discard=_close)
        aborted = False

        def abort() -> None:
            nonlocal aborted
            aborted = True
            response.close()

        if prompt_tokens is None:
            prompt_tokens = _prompt_token_bound(request)
        frames = openai_frames(
            self.id,
            response,
            max_event_bytes=MAX_EVENT_BYTES + self._echo_bytes(prompt_tokens),
            max_tokens=asked_max_tokens(body),
            merge=merge,
        )
        complete = False
        try:
            with self._open.track(request.request_id, abort):
                async with contextlib.aclosing(frames):
                    async for frame in frames:
                        yield frame
            complete = True
        except (aiohttp.ClientError, TimeoutError, BackendError) as failure:
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
        return self._key.scrub(transport_error(self.id, failure, timeout_s))

    def _aborted(self, request: GenerationRequest) -> BackendError:
        return BackendError(self.id, f"request {request.request_id} aborted", retryable=False)


def _close(response: aiohttp.ClientResponse) -> None:
    response.close()


def prefill_answer(backend_id: str, request_id: str, payload: bytes) -> PrefillResult:
    """What a prefill leg's answer says (see ``VllmBackend.prefill``): the KV parameters to
    hand to the decode leg, or the whole completion when it stopped at its first token, or
    neither (empty parameters: the decode engine prefills itself). A malformed answer is a
    retryable BackendError quoting it."""
    try:
        reply = json_object(payload)
        usage = usage_message(reply.get("usage"))
        kv_params = field_object(reply.get("kv_transfer_params"), "kv_transfer_params")
        if kv_params:
            handle = KVHandle(backend_id, request_id, transport_params=kv_params)
            return PrefillResult(b"", -1, usage.prompt_tokens, finished=False, handle=handle)
        choice = first_choice(reply)
        if choice is not None and choice_finish(choice) == "stop":
            text, token_ids = choice_content(choice)
            answer = router_pb2.GenerateResponse(
                text=text,
                token_ids=token_ids,
                finish_reason=finish_reason("stop"),
                usage=usage,
            )
            frame = answer.SerializeToString()
            return PrefillResult(frame, -1, usage.prompt_tokens, finished=True, handle=None)
        handle = KVHandle(backend_id, request_id, transport_params={})
        return PrefillResult(b"", -1, usage.prompt_tokens, finished=False, handle=handle)
    except ShapeError as problem:
        raise malformed(backend_id, "prefill answer", problem, payload) from None


def _refuse_resume_in_a_split(backend_id: str, request: GenerationRequest) -> None:
    if request.generated_ids:
        raise BackendError(
            backend_id, "a resumed request runs colocated (generate), not split", retryable=False
        )


async def _stopped_across_resume(
    frames: AsyncGenerator[bytes, None],
    stops: tuple[str, ...],
    prior_text: str,
    sequence_tokens: int,
) -> AsyncGenerator[bytes, None]:
    """The frames of a resumed stream with its stop strings applied here, over the text
    before the resume too (the engine sees only token ids there).

    Text is held back as vLLM holds it (the longest stop string less one character), so
    the interrupted stream held back the last of ``prior_text``: it goes out first. On a
    match the stream ends with finish ``stop`` (the text cut before the stop string, the
    ids up to the token completing it; usage as the engine counts it, the resumed
    sequence of ``sequence_tokens`` as prompt) and the engine's request is closed.
    """
    hold = max(len(stop) for stop in stops) - 1
    pending = prior_text[len(prior_text) - hold :] if hold else ""
    new_tokens = 0
    async with contextlib.aclosing(frames):
        async for raw in frames:
            frame = router_pb2.GenerateResponse.FromString(raw)
            new_tokens += len(frame.token_ids)
            window = pending + frame.text
            cut = min((i for i in (window.find(stop) for stop in stops) if i >= 0), default=-1)
            if cut >= 0:
                frame.text = window[:cut]
                frame.finish_reason = router_pb2.FINISH_REASON_STOP
                frame.usage.CopyFrom(
                    router_pb2.Usage(prompt_tokens=sequence_tokens, completion_tokens=new_tokens)
                )
                yield frame.SerializeToString()
                return
            if frame.finish_reason:
                frame.text, pending = window, ""
            else:
                released = max(len(window) - hold, 0)
                frame.text, pending = window[:released], window[released:]
            if frame.text or frame.token_ids or frame.finish_reason:
                yield frame.SerializeToString()


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
        return json_object(payload)
    except ShapeError:
        return None


def listed_max_model_len(listing: Any, served_model: str) -> int | None:
    """``max_model_len`` of a ``/v1/models`` listing: the served model's entry if it is
    listed, else the smallest (aliases and LoRA adapters of one engine share it)."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        return None
    limits: dict[str, int] = {}
    smallest: int | None = None
    for entry in entries:
        limit = entry.get("max_model_len") if isinstance(entry, dict) else None
        if _is_count(limit) and limit > 0:
            smallest = limit if smallest is None else min(smallest, limit)
            if isinstance(model_id := entry.get("id"), str):
                limits[model_id] = limit
    return limits.get(served_model, smallest)


def _positive(settings: Mapping[str, Any], name: str) -> float:
    try:
        value = float(settings[name])
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {settings[name]!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value:g}")
    return value


def metrics_load(page: str) -> BackendLoad:
    """The load a ``/metrics`` page shows (see ``VllmBackend.load``). A sample that is not a
    finite number >= 0 (``NaN``, ``+Inf``, a negative gauge) counts as absent."""
    samples = {
        name: [s for s in found if math.isfinite(s.value) and s.value >= 0]
        for name, found in parse_prometheus(page, _LOAD_METRICS).items()
    }
    used, capacity = _kv_tokens(samples)
    return BackendLoad(
        waiting=_count(sum(s.value for s in samples.get(_WAITING, ()))),
        running=_count(sum(s.value for s in samples.get(_RUNNING, ()))),
        kv_tokens_used=used,
        kv_tokens_capacity=capacity,
    )


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
        return _count(used), sum(capacity[engine] for engine in usage)
    mean = sum(usage.values()) / len(usage)
    return _count(mean * KV_USAGE_SCALE), KV_USAGE_SCALE


def _count(value: float) -> int:
    """A figure as a whole number; 0 (unknown) when it is none (a sum past a float's range)."""
    return round(value) if math.isfinite(value) else 0


def _capacity_tokens(labels: Mapping[str, str]) -> int:
    """KV capacity of one engine in tokens, 0 when unknown (blocks are "None" until
    the engine has profiled its memory)."""
    blocks, block_size = labels.get("num_gpu_blocks", ""), labels.get("block_size", "")
    if _is_small_number(blocks) and _is_small_number(block_size):
        return int(blocks) * int(block_size)
    return 0


def _is_small_number(label: str) -> bool:
    """ASCII digits, short enough for int() (isdigit alone lets "²" through)."""
    return label.isascii() and label.isdigit() and len(label) <= _MAX_LABEL_DIGITS
