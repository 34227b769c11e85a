"""The floor of the router's gRPC door: a bare grpc.aio relay of a vLLM P/D split.

``python -m bench.peers.relay --prefill HOST:PORT --decode HOST:PORT`` serves the front
door's ``Generate`` (the same proto, so the same client measures both) and prints
``READY host:port``; it exits when stdin closes. For each call it does what the router's
gRPC door must do for a split over vLLM engines, and nothing else:

- the prefill leg: POST the body the router's ``vllm`` adapter sends (the same fields,
  ``max_tokens`` 1, ``stream`` false, vLLM's remote-decode ``kv_transfer_params``, the
  request id in ``X-Request-Id``) on a keep-alive aiohttp session, and read the answer's
  ``kv_transfer_params``;
- the decode leg: POST the streaming body with those parameters, split the SSE events,
  parse each (orjson) and send one encoded ``GenerateResponse`` per event (its text and
  token ids; the route on the first, the finish reason and usage where the engine gives
  them), through grpc.aio with the identity response serializer, as the router forwards
  its frames.

What the router adds on top (admission, scheduling, the pool's view, deadlines, retries
and failover, metrics, logs, validation of what engines send) is absent, so the gRPC
door's added TTFT minus this relay's is what that software costs on a split, and this
relay's CPU per request is the floor of a Python process doing the same I/O. It runs on
uvloop, like the router.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import orjson
import uvloop

from backends._gen.hetero.router.v1 import router_pb2

_PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_FINISH: dict[str, router_pb2.FinishReason.ValueType] = {
    "stop": router_pb2.FINISH_REASON_STOP,
    "length": router_pb2.FINISH_REASON_LENGTH,
}
_TIMEOUT = aiohttp.ClientTimeout(total=60)


class Relay:
    def __init__(self, prefill: str, decode: str, model: str) -> None:
        self._prefill_url = f"http://{prefill}/v1/completions"
        self._decode_url = f"http://{decode}/v1/completions"
        self._model = model
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024), timeout=_TIMEOUT
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _body(self, request: router_pb2.GenerateRequest) -> dict[str, Any]:
        """The fields the router's vllm adapter sends on both legs."""
        sampling = request.sampling
        return {
            "model": self._model,
            "prompt": request.prompt,
            "max_tokens": sampling.max_tokens if sampling.HasField("max_tokens") else 256,
            "temperature": sampling.temperature if sampling.HasField("temperature") else 1.0,
            "top_p": sampling.top_p if sampling.HasField("top_p") else 1.0,
            "seed": sampling.seed & 0x7FFFFFFFFFFFFFFF,
            "stop": list(sampling.stop),
            "return_token_ids": True,
        }

    async def generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if self._session is None:
            raise RuntimeError("start() first")
        request_id = request.request_id or uuid.uuid4().hex
        headers = {"X-Request-Id": request_id}
        body = self._body(request)
        prefill = {**body, "max_tokens": 1, "stream": False}
        prefill["kv_transfer_params"] = dict(_PREFILL_KV_PARAMS)
        async with self._session.post(self._prefill_url, json=prefill, headers=headers) as answer:
            answer.raise_for_status()
            params = orjson.loads(await answer.read()).get("kv_transfer_params")
        decode = {**body, "stream": True, "stream_options": {"include_usage": True}}
        if params:
            decode["kv_transfer_params"] = params
        route = router_pb2.Route(
            mode=router_pb2.ROUTE_MODE_SPLIT,
            prefill_backend="p0",
            decode_backend="d0",
            request_id=request_id,
            seed=body["seed"],
        )
        first = True
        async with self._session.post(self._decode_url, json=decode, headers=headers) as stream:
            stream.raise_for_status()
            buffer = b""
            async for chunk in stream.content.iter_any():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: {"):
                        continue
                    frame = _frame(orjson.loads(event[6:]))
                    if first:
                        frame.route.CopyFrom(route)
                        first = False
                    yield frame.SerializeToString()


def _frame(event: dict[str, Any]) -> router_pb2.GenerateResponse:
    frame = router_pb2.GenerateResponse()
    choices = event.get("choices") or []
    if choices:
        choice = choices[0]
        frame.text = choice.get("text") or ""
        frame.token_ids.extend(choice.get("token_ids") or ())
        frame.finish_reason = _FINISH.get(
            choice.get("finish_reason") or "", router_pb2.FINISH_REASON_UNSPECIFIED
        )
    usage = event.get("usage")
    if usage:
        frame.usage.prompt_tokens = usage.get("prompt_tokens", 0)
        frame.usage.completion_tokens = usage.get("completion_tokens", 0)
    return frame


async def serve(prefill: str, decode: str, model: str) -> None:
    relay = Relay(prefill, decode, model)
    await relay.start()
    server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
    handler = grpc.method_handlers_generic_handler(
        "hetero.router.v1.Router",
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                relay.generate,
                request_deserializer=router_pb2.GenerateRequest.FromString,
                response_serializer=None,  # frames are already encoded, as the router's are
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY 127.0.0.1:{port}", flush=True)
    await asyncio.to_thread(sys.stdin.buffer.read)  # the parent holds our stdin
    await server.stop(0)
    await relay.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.relay", description=__doc__)
    parser.add_argument("--prefill", required=True, help="the prefill engine, host:port")
    parser.add_argument("--decode", required=True, help="the decode engine, host:port")
    parser.add_argument("--model", default="fake", help="the model name sent to the engines")
    options = parser.parse_args()
    uvloop.run(serve(options.prefill, options.decode, options.model))


if __name__ == "__main__":
    main()
