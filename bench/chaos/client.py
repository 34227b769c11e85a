"""The chaos run's client: every token id of every request, and how its stream ended.

No client-side retries (the channel has no retry policy): what the router does with
a failure is what the client sees. A request that outlives its deadline is
cancelled and recorded as such, never waited for.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from backends._gen.hetero.router.v1 import router_pb2
from bench.chaos.verdicts import DEADLINE, Delivery
from bench.chaos.workload import ChaosRequest
from router.client import GENERATE_METHOD, ROUTER_SERVICE, build_request

_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.enable_retries", 0)]


class ChaosClient:
    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        self._generate = self._channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        self._list_backends = self._channel.unary_unary(
            f"/{ROUTER_SERVICE}/ListBackends",
            request_serializer=router_pb2.ListBackendsRequest.SerializeToString,
            response_deserializer=router_pb2.ListBackendsResponse.FromString,
        )

    async def send(
        self, request: ChaosRequest, prompt: str, *, deadline_s: float, request_id: str
    ) -> Delivery:
        """One request, token by token; failures are recorded, never raised."""
        message = build_request(
            prompt,
            max_tokens=request.output_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            disaggregation=request.mode,
            request_id=request_id,
        )
        delivery = Delivery(index=request.index, start_s=time.monotonic())
        try:
            async with asyncio.timeout(deadline_s):
                async for response in self._generate(message):
                    _take(delivery, response, time.monotonic())
        except grpc.aio.AioRpcError as error:
            delivery.status = error.code().name
            delivery.detail = error.details() or ""
        except TimeoutError:
            delivery.status = DEADLINE
            delivery.detail = f"no final frame within {deadline_s:g} s"
        delivery.end_s = time.monotonic()
        return delivery

    async def backends(self, timeout_s: float) -> dict[str, tuple[bool, int]] | None:
        """Each backend's health and requests in flight, as the router sees them."""
        try:
            answer = await self._list_backends(router_pb2.ListBackendsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None
        return {b.id: (b.healthy, b.outstanding) for b in answer.backends}

    async def close(self) -> None:
        await self._channel.close()


def _take(delivery: Delivery, response: router_pb2.GenerateResponse, now: float) -> None:
    if response.HasField("route"):
        delivery.prefill_backend = response.route.prefill_backend
        delivery.decode_backend = response.route.decode_backend
    if response.token_ids:
        if delivery.first_token_s is None:
            delivery.first_token_s = now
        delivery.token_ids.extend(response.token_ids)
        delivery.token_times_s.extend([now] * len(response.token_ids))
    if response.finish_reason:
        delivery.finish_reason = response.finish_reason
        delivery.completion_tokens = response.usage.completion_tokens
