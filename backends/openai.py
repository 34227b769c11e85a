"""The adapter for any OpenAI-compatible endpoint, as a colocated backend.

A hosted API (Groq, Cerebras) or a plain vLLM serves whole requests: there is no
KV cache to hand over, so the adapter takes no part in a split. Its capabilities
say so (roles ``decode`` and ``both``, handoff ``NONE``) and ``prefill``/``decode``
refuse with a non-retryable error. Give it role ``both`` in the pool file: the
scheduler prefers ``both`` backends for colocated plans, and ``decode`` only lists
it as the colocated fallback when no ``both`` backend serves the model.

The API key comes from ``api_key_env`` (a variable name) or ``api_key_file`` (a
path), never from the pool file. It is held by a :class:`Secret`, whose repr is
redacted, and sent as the session's default ``Authorization`` header; every error
message is scrubbed of it in case a provider echoes it back (some quote the key
they rejected).

What the provider answers is type-checked and size-capped as in
:mod:`backends.http_common`: a malformed chunk is a retryable ``BackendError`` quoting
it. Streams are not resumed (``Capabilities.resume`` is false): hosted APIs take no
token ids.

Options: ``base_url`` (full URL up to the version, e.g.
``https://api.groq.com/openai/v1``; default ``http://{address}/v1``), ``model``
(the provider's name for the model; default the request's), ``api_key_env`` or
``api_key_file``, ``max_connections`` (default 1024), ``connect_timeout_s``
(default 5) and ``idle_timeout_s`` (longest silence mid-stream, default 60).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp

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
    MAX_PAGE_BYTES,
    ExchangeAborted,
    OpenExchanges,
    Secret,
    ShapeError,
    asked_max_tokens,
    client_timeout,
    connector,
    malformed_detail,
    openai_frames,
    parse_json,
    read_api_key,
    read_body,
    reject_inline_key,
    status_error,
    transport_error,
)
from backends.tls import client_tls

# What a failed exchange can raise besides an HTTP status or a BackendError.
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


def openai_body(request: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
    """The path (relative to ``/v1``) and streaming body of a request in the OpenAI protocol."""
    sampling = request.sampling
    body: dict[str, Any] = {"model": model}
    if request.messages:
        path = "/chat/completions"
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        path = "/completions"
        body["prompt"] = request.prompt
    body.update(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stream=True,
        # Without it the stream carries no token counts and the last frame no usage.
        stream_options={"include_usage": True},
    )
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    return path, body


class OpenAIBackend(Backend):
    """A colocated OpenAI-compatible endpoint: ``generate`` only."""

    def __init__(
        self, backend_id: str, address: str, options: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(backend_id, address, options)
        reject_inline_key(self.options)
        self._tls = client_tls(self.options)  # files read now, like the key
        scheme = "https" if self._tls else "http"
        self._base_url = str(self.options.get("base_url") or f"{scheme}://{address}/v1").rstrip("/")
        if self._tls and not self._base_url.startswith("https://"):
            raise ValueError(f"tls is set but base_url {self._base_url} is not https://")
        self._model = str(self.options["model"]) if self.options.get("model") else None
        self._max_connections = int(self.options.get("max_connections", 1024))
        self._connect_timeout_s = float(self.options.get("connect_timeout_s", 5.0))
        self._idle_timeout_s = float(self.options.get("idle_timeout_s", 60.0))
        # Read now so that a missing secret fails at start-up, naming the option.
        self._key = Secret(read_api_key(self.options))
        self._session: aiohttp.ClientSession | None = None
        self._exchanges = OpenExchanges()

    def __repr__(self) -> str:
        return f"OpenAIBackend(id={self.id!r}, base_url={self._base_url!r})"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            roles=frozenset({Role.DECODE, Role.BOTH}),
            handoff_modes=frozenset({HandoffMode.NONE}),
        )

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=connector(self._max_connections, self._tls),
            headers=self._key.headers(),
        )

    async def close(self) -> None:
        self._exchanges.abort_all()
        if self._session is not None:
            await self._session.close()

    async def check_health(self, timeout_s: float) -> HealthStatus:
        """Serving when ``/models`` answers 200 and, if it lists models, lists ours.

        The model name is not reported: the provider's name (``options.model``) need not
        match the pool file's, which the health checker would then flag as a mismatch.
        """
        session = self._require_session()
        timeout = client_timeout(timeout_s, self._connect_timeout_s)
        try:
            async with session.get(f"{self._base_url}/models", timeout=timeout) as response:
                if response.status != 200:
                    # The body is not quoted: a 401 body may echo the key.
                    return HealthStatus(
                        serving=False, detail=f"GET /models: HTTP {response.status}"
                    )
                body = await read_body(self.id, response, MAX_PAGE_BYTES, "/models listing")
        except _TRANSPORT_ERRORS as error:
            failure = transport_error(self.id, error, timeout_s, self._tls)
            return HealthStatus(
                serving=False,
                detail=self._key.clean(failure.message),
                timed_out=isinstance(error, TimeoutError),
            )
        except BackendError as error:
            return HealthStatus(serving=False, detail=self._key.clean(error.message))
        try:
            listing = parse_json(body)
        except ShapeError as problem:
            detail = malformed_detail("/models listing", problem, body)
            return HealthStatus(serving=False, detail=self._key.clean(detail))
        offered = model_ids(listing)
        if self._model and offered and self._model not in offered:
            return HealthStatus(serving=False, detail=f"model {self._model!r} is not offered")
        return HealthStatus(serving=True)

    async def load(self, timeout_s: float) -> BackendLoad:
        """Nothing to read: hosted APIs publish no queue depth or KV use.

        The scheduler sees the zero load and relies on the router's own outstanding
        count for this backend.
        """
        return BackendLoad()

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        raise BackendError(
            self.id,
            "colocated only: an OpenAI endpoint cannot prefill for another backend",
            retryable=False,
        )

    def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        raise BackendError(
            self.id,
            "colocated only: an OpenAI endpoint cannot decode a handed-over KV cache",
            retryable=False,
        )

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        path, body = openai_body(request, self._model or request.model)
        try:
            async with (
                self._open(request, path, body, timeout_s) as response,
                contextlib.aclosing(
                    openai_frames(self.id, response, max_tokens=asked_max_tokens(body))
                ) as frames,
            ):
                async for frame in frames:
                    yield frame
        except ExchangeAborted:
            raise BackendError(self.id, "aborted", retryable=False) from None
        except _TRANSPORT_ERRORS as error:
            raise self._key.scrub(transport_error(self.id, error, timeout_s)) from None
        except BackendError as error:
            raise self._key.scrub(error) from None

    async def abort(self, request_id: str, timeout_s: float) -> None:
        """Closes the request's stream: OpenAI-compatible servers stop on a closed connection."""
        self._exchanges.abort(request_id)

    @contextlib.asynccontextmanager
    async def _open(
        self, request: GenerationRequest, path: str, body: Mapping[str, Any], timeout_s: float
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The streaming response, 2xx only, closed on exit and on ``abort``."""
        session = self._require_session()
        timeout = client_timeout(timeout_s, self._connect_timeout_s, self._idle_timeout_s)
        post = session.post(
            f"{self._base_url}{path}",
            json=body,
            headers=request.trace_headers(),
            timeout=timeout,
        )
        request_id = request.request_id
        response = await self._exchanges.run(request_id, _response_of(post), discard=_close)
        with self._exchanges.track(request_id, response.close):
            try:
                if response.status >= 300:
                    raise status_error(self.id, response.status, await response.content.read(4096))
                yield response
            except BaseException:
                # Closing the connection is how an OpenAI-compatible server learns to stop:
                # an early exit must not leave it generating for nobody.
                response.close()
                raise
            else:
                response.release()  # back to the pool if the body was read to its end

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BackendError(self.id, "adapter not started", retryable=True)
        return self._session


async def _response_of(request: Any) -> aiohttp.ClientResponse:
    """Awaits aiohttp's request context manager (it is awaitable, not a coroutine)."""
    response: aiohttp.ClientResponse = await request
    return response


def _close(response: aiohttp.ClientResponse) -> None:
    response.close()


def model_ids(listing: Any) -> set[str]:
    """The ids (strings) of a ``/models`` listing; empty when the body is not the usual shape."""
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return set()
    return {
        entry["id"]
        for entry in listing["data"]
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    }
