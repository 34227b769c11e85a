"""Load generation against the router's front door or straight against a device.

Open loop sends each request at its arrival time whatever happens to earlier
ones (Poisson arrivals); closed loop keeps a fixed number in flight. Both are
bounded in count and in time, and talk only to the addresses they are given.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import aiohttp
import grpc

from backends._gen.hetero.device.v1 import device_pb2
from backends._gen.hetero.router.v1 import router_pb2
from bench.prompts import chained_prompt, prompt_text
from router.client import GENERATE_METHOD
from router.sim.metrics import RequestRecord
from router.sim.workload import RequestSpec

_OPTIONS = [("grpc.max_receive_message_length", 16 << 20)]


class Target(Protocol):
    name: str

    def stream(self, prompt: str, max_tokens: int, seed: int) -> AsyncIterator[int]:
        """Sends one request; yields the number of tokens in each message received."""
        ...

    async def close(self) -> None: ...


class RouterTarget:
    """The router's gRPC front door."""

    def __init__(
        self,
        address: str,
        name: str = "router",
        disaggregation: str = "auto",
        *,
        slo_class: str = "",
        request_ids: str = "",
    ) -> None:
        """``request_ids``, when set, names each request ``request_ids`` + its seed, so
        that the router's log lines can be matched with the client's records."""
        self.name = name
        self._slo_class = slo_class
        self._request_ids = request_ids
        self._channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        self._call = self._channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        self._mode = {
            "auto": router_pb2.DISAGGREGATION_AUTO,
            "split": router_pb2.DISAGGREGATION_SPLIT,
            "colocated": router_pb2.DISAGGREGATION_COLOCATED,
        }[disaggregation]

    async def stream(self, prompt: str, max_tokens: int, seed: int) -> AsyncIterator[int]:
        request = router_pb2.GenerateRequest(
            request_id=f"{self._request_ids}{seed}" if self._request_ids else "",
            prompt=prompt,
            sampling=router_pb2.SamplingParams(max_tokens=max_tokens, seed=seed),
            disaggregation=self._mode,
            slo_class=self._slo_class,
        )
        async for response in self._call(request):
            yield len(response.token_ids)

    async def close(self) -> None:
        await self._channel.close()


class DeviceTarget:
    """A mock device's own Generate: the path without the router."""

    def __init__(self, address: str, name: str = "direct") -> None:
        self.name = name
        self._channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        self._call = self._channel.unary_stream(
            "/hetero.device.v1.Device/Generate",
            request_serializer=device_pb2.DeviceGenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        self._ids = itertools.count()

    async def stream(self, prompt: str, max_tokens: int, seed: int) -> AsyncIterator[int]:
        request = device_pb2.DeviceGenerateRequest(
            request_id=f"{self.name}-{next(self._ids)}",
            prompt=prompt,
            sampling=device_pb2.Sampling(
                max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=seed
            ),
        )
        async for response in self._call(request):
            yield len(response.token_ids)

    async def close(self) -> None:
        await self._channel.close()


class HttpTarget:
    """The router's OpenAI-compatible door: streamed /v1/completions over HTTP."""

    def __init__(self, base_url: str, name: str = "router-http", disaggregation: str = "auto"):
        self.name = name
        self._url = base_url.rstrip("/") + "/v1/completions"
        self._mode = disaggregation
        self._session: aiohttp.ClientSession | None = None

    async def stream(self, prompt: str, max_tokens: int, seed: int) -> AsyncIterator[int]:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0)  # the load generator bounds concurrency
            self._session = aiohttp.ClientSession(connector=connector)
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
            "disaggregation": self._mode,
        }
        counted = 0
        async with self._session.post(self._url, json=body) as response:
            if response.status != 200:
                raise HttpStatusError(response.status)
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise HttpStatusError(502)
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    counted += 1
                    yield 1
                elif not choices and "usage" in event:
                    # SSE events carry text, not token counts: a coalesced event counts
                    # as one, and the usage at the end supplies the rest.
                    extra = event["usage"]["completion_tokens"] - counted
                    if extra > 0:
                        yield extra

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class HttpStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


async def send(target: Target, spec: RequestSpec, seed: int, timeout_s: float) -> RequestRecord:
    """One request, timed token by token. Failures are recorded, never raised."""
    prompt = _prompt(spec, seed)
    record = RequestRecord(start_s=time.monotonic(), prompt_tokens=spec.prompt_tokens)
    try:
        async with asyncio.timeout(timeout_s):
            async for tokens in target.stream(prompt, spec.output_tokens, seed):
                now = time.monotonic()
                if tokens and record.first_token_s is None:
                    record.first_token_s = now
                record.token_times_s.extend(itertools.repeat(now, tokens))
    except grpc.aio.AioRpcError as error:
        record.outcome = error.code().name
    except HttpStatusError as error:
        record.outcome = f"HTTP_{error.status}"
    except aiohttp.ClientError as error:
        record.outcome = type(error).__name__
    except TimeoutError:
        record.outcome = "timeout"
    record.end_s = time.monotonic()
    return record


_PROMPTS: dict[tuple[int, int], str] = {}
_BLOCKS: dict[tuple[int, int], str] = {}  # chain blocks' texts by (id, tokens)


def _prompt(spec: RequestSpec, seed: int) -> str:
    """Prompts are made before the clock starts mattering, and reused; a chained prompt
    is joined from block texts made before, with its own tail."""
    if spec.prefix_group >= 0 or spec.block_hashes:
        return chained_prompt(spec, seed, _BLOCKS)
    key = (spec.prompt_tokens, seed % 16)
    if key not in _PROMPTS:
        # The mock counts BOS as a token: the text is one byte shorter than the prompt.
        _PROMPTS[key] = prompt_text(max(spec.prompt_tokens - 1, 1), seed=key[1])
    return _PROMPTS[key]


def warm_prompts(specs: Sequence[RequestSpec]) -> None:
    for index, spec in enumerate(specs):
        _prompt(spec, index)


async def open_loop(
    target: Target,
    specs: Sequence[RequestSpec],
    *,
    timeout_s: float = 60.0,
    on_done: Callable[[], Any] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Sends each request at its ``arrival_s``; returns the records and the run's duration."""
    warm_prompts(specs)
    started = time.monotonic()

    async def one(index: int, spec: RequestSpec) -> RequestRecord:
        await asyncio.sleep(max(0.0, started + spec.arrival_s - time.monotonic()))
        record = await send(target, spec, index, timeout_s)
        if on_done:
            on_done()
        return record

    records = await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
    return list(records), time.monotonic() - started


async def closed_loop(
    target: Target,
    specs: Sequence[RequestSpec],
    concurrency: int,
    *,
    timeout_s: float = 60.0,
    on_done: Callable[[], Any] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Keeps ``concurrency`` requests in flight until every spec was sent."""
    warm_prompts(specs)
    pending = iter(enumerate(specs))
    records: list[RequestRecord] = []
    started = time.monotonic()

    async def worker() -> None:
        for index, spec in pending:
            records.append(await send(target, spec, index, timeout_s))
            if on_done:
                on_done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.monotonic() - started
