"""Python SDK for the router's gRPC endpoint, sync and async.

from router.client import RouterClient

with RouterClient("127.0.0.1:50051") as client:
    for chunk in client.generate("Hello", max_tokens=32, temperature=0):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import grpc

from backends._gen.hetero.router.v1 import router_pb2
from router import defaults

GenerateResponse = router_pb2.GenerateResponse
DisaggregationName = Literal["auto", "split", "colocated"]

# The front door's full service name, from the proto itself.
ROUTER_SERVICE: str = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
GENERATE_METHOD = f"/{ROUTER_SERVICE}/Generate"
DEFAULT_ADDRESS = defaults.GRPC_ADDRESS
# The retry policy clients should use, published for every language (deploy/ has a copy).
SERVICE_CONFIG_RESOURCE = "defaults/grpc-service-config.json"
_DISAGGREGATION = {
    "auto": router_pb2.DISAGGREGATION_AUTO,
    "split": router_pb2.DISAGGREGATION_SPLIT,
    "colocated": router_pb2.DISAGGREGATION_COLOCATED,
}


def build_request(
    prompt: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    model: str = "",
    disaggregation: DisaggregationName = "auto",
    request_id: str = "",
    slo_ttft_ms: int | None = None,
    slo_tpot_ms: int | None = None,
    priority: int = 0,
    slo_class: str = "",
) -> router_pb2.GenerateRequest:
    """The request message; unset sampling fields and SLO targets take the router's defaults.

    ``slo_ttft_ms``/``slo_tpot_ms``: time to first token and time per output token the
    request is held to (unset: its SLO class's); ``priority`` 0..9, larger is more
    urgent; ``slo_class`` names a class of the router's scheduling policy ("": default).
    """
    sampling = router_pb2.SamplingParams(stop=list(stop))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    slo = router_pb2.Slo()
    if slo_ttft_ms is not None:
        slo.ttft_ms = slo_ttft_ms
    if slo_tpot_ms is not None:
        slo.tpot_ms = slo_tpot_ms
    return router_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt=prompt,
        sampling=sampling,
        disaggregation=_DISAGGREGATION[disaggregation],
        slo=slo if slo.ListFields() else None,
        priority=priority,
        slo_class=slo_class,
    )


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach the router: address, deadline, TLS, bearer token, retries."""

    address: str = DEFAULT_ADDRESS
    timeout_s: float | None = None  # deadline of each call
    tls: bool = False
    root_certificates: bytes | None = None  # PEM; None uses the system's roots
    # mTLS: the client's certificate chain and private key (PEM), both or neither.
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    bearer_token: str | None = None
    # gRPC retries a call that fails UNAVAILABLE before its first response
    # message, i.e. before the first token: a stream is never replayed. Each retry
    # waits the router's grpc-retry-pushback-ms, else the policy's backoff.
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key go together")
        if self.certificate_chain is not None and not self.tls:
            raise ValueError("a client certificate needs tls=True")

    def service_config(self) -> str:
        """The published service config (router/defaults/grpc-service-config.json) with
        ``max_attempts``; no retry policy at all for one attempt."""
        config = json.loads(service_config_json())
        for method in config["methodConfig"]:
            if self.max_attempts > 1:
                method["retryPolicy"]["maxAttempts"] = self.max_attempts
            else:  # gRPC refuses a retry policy of fewer than 2 attempts
                del method["retryPolicy"]
        return json.dumps(config)

    def options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.enable_retries", 1 if self.max_attempts > 1 else 0),
            ("grpc.service_config", self.service_config()),
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.bearer_token}"),) if self.bearer_token else ()

    def credentials(self) -> Any:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def service_config_json() -> str:
    """The service config the router publishes for its clients, as packaged."""
    return resources.files("router").joinpath(SERVICE_CONFIG_RESOURCE).read_text()


def _methods(channel: Any) -> tuple[Any, Any]:
    """The Generate and ListBackends callables of a sync or asyncio channel."""
    generate = channel.unary_stream(
        GENERATE_METHOD,
        request_serializer=router_pb2.GenerateRequest.SerializeToString,
        response_deserializer=router_pb2.GenerateResponse.FromString,
    )
    list_backends = channel.unary_unary(
        f"/{ROUTER_SERVICE}/ListBackends",
        request_serializer=router_pb2.ListBackendsRequest.SerializeToString,
        response_deserializer=router_pb2.ListBackendsResponse.FromString,
    )
    return generate, list_backends


def _config(address: str | ChannelConfig, timeout_s: float | None) -> ChannelConfig:
    if isinstance(address, ChannelConfig):
        return address
    return ChannelConfig(address=address, timeout_s=timeout_s)


class RouterClient:
    """Blocking client; one channel, safe to share between threads.

    ``RouterClient("host:port")`` or ``RouterClient(ChannelConfig(...))`` for TLS,
    a bearer token or other retry settings.
    """

    def __init__(
        self, address: str | ChannelConfig = DEFAULT_ADDRESS, *, timeout_s: float | None = None
    ) -> None:
        self.config = config = _config(address, timeout_s)
        self._channel = (
            grpc.secure_channel(config.address, config.credentials(), options=config.options())
            if config.tls
            else grpc.insecure_channel(config.address, options=config.options())
        )
        self._generate, self._list_backends = _methods(self._channel)

    def generate(self, prompt: str, **options: Any) -> Iterator[router_pb2.GenerateResponse]:
        """Streams responses; keyword options are those of ``build_request``."""
        call = self._generate(
            build_request(prompt, **options),
            timeout=self.config.timeout_s,
            metadata=self.config.metadata(),
        )
        try:
            yield from call
        finally:
            call.cancel()  # leaving the loop early stops the work on the backends

    def list_backends(self) -> router_pb2.ListBackendsResponse:
        response: router_pb2.ListBackendsResponse = self._list_backends(
            router_pb2.ListBackendsRequest(),
            timeout=self.config.timeout_s,
            metadata=self.config.metadata(),
        )
        return response

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRouterClient:
    """asyncio client; create it inside a running event loop."""

    def __init__(
        self, address: str | ChannelConfig = DEFAULT_ADDRESS, *, timeout_s: float | None = None
    ) -> None:
        self.config = config = _config(address, timeout_s)
        self._channel = (
            grpc.aio.secure_channel(config.address, config.credentials(), options=config.options())
            if config.tls
            else grpc.aio.insecure_channel(config.address, options=config.options())
        )
        self._generate, self._list_backends = _methods(self._channel)

    async def generate(
        self, prompt: str, **options: Any
    ) -> AsyncGenerator[router_pb2.GenerateResponse, None]:
        call = self._generate(
            build_request(prompt, **options),
            timeout=self.config.timeout_s,
            metadata=self.config.metadata(),
        )
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def list_backends(self) -> router_pb2.ListBackendsResponse:
        response: router_pb2.ListBackendsResponse = await self._list_backends(
            router_pb2.ListBackendsRequest(),
            timeout=self.config.timeout_s,
            metadata=self.config.metadata(),
        )
        return response

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
