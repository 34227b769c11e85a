"""The floor of the router's HTTP door: a bare aiohttp relay of a vLLM P/D split.

``python -m bench.peers.http_relay --prefill HOST:PORT --decode HOST:PORT`` serves
``POST /v1/completions`` and prints ``READY host:port``; it exits when stdin closes.
For each request it does the least a Python (aiohttp on uvloop) HTTP router can do for
a split over vLLM engines, and nothing else:

- the prefill leg: POST the client's body with ``max_tokens`` 1, ``stream`` false and
  vLLM's remote-decode ``kv_transfer_params``, the request id in ``X-Request-Id``, on a
  keep-alive aiohttp session, and read the answer's ``kv_transfer_params``;
- the decode leg: POST the client's body with those parameters and forward the
  engine's SSE bytes to the client as they come, untouched (raw passthrough: no event
  is parsed or re-encoded).

It has none of the HTTP door's work: no validation, admission, scheduling, deadlines,
retries or failover, no rewriting of the events (ids, model name, the ``max_tokens``
cut), no metrics or logs. So its CPU per request is what the same I/O costs through
aiohttp in one Python process: the HTTP door cannot go below it by trimming its own
code, and a raw passthrough in the door would at best approach it. It runs on uvloop,
like the router.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

_PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_TIMEOUT = aiohttp.ClientTimeout(total=60)
_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class HttpRelay:
    def __init__(self, prefill: str, decode: str) -> None:
        self._prefill_url = f"http://{prefill}/v1/completions"
        self._decode_url = f"http://{decode}/v1/completions"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024), timeout=_TIMEOUT
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            raise RuntimeError("start() first")
        body: dict[str, Any] = orjson.loads(await request.read())
        body.pop("disaggregation", None)  # the router's own field, if a client sends it
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {**_JSON, "X-Request-Id": request_id}
        prefill = {**body, "max_tokens": 1, "stream": False}
        prefill["kv_transfer_params"] = dict(_PREFILL_KV_PARAMS)
        async with self._session.post(
            self._prefill_url, data=orjson.dumps(prefill), headers=headers
        ) as answer:
            answer.raise_for_status()
            params = orjson.loads(await answer.read()).get("kv_transfer_params")
        decode = {**body, "stream": True}
        if params:
            decode["kv_transfer_params"] = params
        response = web.StreamResponse(headers=_SSE)
        async with self._session.post(
            self._decode_url, data=orjson.dumps(decode), headers=headers
        ) as stream:
            stream.raise_for_status()
            await response.prepare(request)
            async for chunk in stream.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
        return response


async def serve(prefill: str, decode: str) -> None:
    relay = HttpRelay(prefill, decode)
    await relay.start()
    app = web.Application()
    app.router.add_post("/v1/completions", relay.completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"READY {host}:{port}", flush=True)
    await asyncio.to_thread(sys.stdin.buffer.read)  # the parent holds our stdin
    await runner.cleanup()
    await relay.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.http_relay", description=__doc__)
    parser.add_argument("--prefill", required=True, help="the prefill engine, host:port")
    parser.add_argument("--decode", required=True, help="the decode engine, host:port")
    options = parser.parse_args()
    uvloop.run(serve(options.prefill, options.decode))


if __name__ == "__main__":
    main()
