"""python -m bench.leg_cost: what the ``vllm`` adapter's two legs of a split cost beside
the same two POSTs made bare with aiohttp, one request at a time, in one process.

Both run here, on uvloop, against the two zero-cost fake engines of scenario ``peers``
(each in a process of its own), for ``--requests`` split requests of 16 tokens each,
``--rounds`` times in turns whose order alternates:

- ``bare aiohttp``: the prefill POST (the adapter's fields, ``max_tokens`` 1, ``stream``
  false, vLLM's remote-decode ``kv_transfer_params``) and its answer's parameters read,
  then the streaming decode POST with them, its body read to the end unparsed: what the
  aiohttp relay (``bench.peers.http_relay``) does on its legs;
- ``vllm adapter``: ``VllmBackend.prefill`` and ``VllmBackend.decode`` with every frame
  taken: the same bodies, plus what the adapter does on top (the events parsed and
  checked, token frames made, its exchanges abortable, its deadlines).

The figure is this process's CPU per request (``time.process_time``: the fakes' is
not in it) of the median round, and the adapter's over the bare legs'. Neither the
door nor the dispatcher runs, so the difference is the adapter's own share of the
router's per-request work (bench/README.md, "Where the HTTP door's CPU goes").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from backends.base import GenerationRequest, SamplingParams
from backends.vllm import VllmBackend
from bench.fake_vllm import PREFILL_KV_REQUEST
from bench.scenarios import peers
from router.console import render, table

BARE = "bare aiohttp"
ADAPTER = "vllm adapter"
MAX_TOKENS = 16
PROMPT = "def handler(request): return request.json()"
WARM_UP = 50  # requests each system makes before a round counts
_SERVED = "fake"


@dataclass(frozen=True)
class Figures:
    name: str
    cpu_us_per_request: float  # the median round's
    wall_us_per_request: float  # the median round's
    ratio: float | None  # CPU over the bare legs'; None without them


def figures(rounds: dict[str, list[tuple[float, float]]]) -> list[Figures]:
    """Each system's median round of (CPU, wall) microseconds a request, and its CPU
    over the bare legs' of the same run; a system with no rounds is left out."""
    medians = {
        name: (statistics.median(c for c, _ in spells), statistics.median(w for _, w in spells))
        for name, spells in rounds.items()
        if spells
    }
    bare = medians.get(BARE)
    return [
        Figures(name, cpu, wall, None if bare is None else cpu / bare[0])
        for name, (cpu, wall) in medians.items()
    ]


class BareLegs:
    """The split's two POSTs as the relay makes them, with the adapter's fields."""

    def __init__(self, prefill: str, decode: str) -> None:
        self._prefill = f"http://{prefill}/v1/completions"
        self._decode = f"http://{decode}/v1/completions"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=60)
        )

    async def split(self, index: int) -> None:
        body: dict[str, Any] = {
            "model": _SERVED,
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": index,
            "stop": [],
            "return_token_ids": True,
        }
        headers = {"Content-Type": "application/json", "X-Request-Id": f"bare-{index}"}
        prefill = {**body, "max_tokens": 1, "stream": False}
        prefill["kv_transfer_params"] = dict(PREFILL_KV_REQUEST)
        async with self._session.post(
            self._prefill, data=orjson.dumps(prefill), headers=headers
        ) as answer:
            answer.raise_for_status()
            params = orjson.loads(await answer.read()).get("kv_transfer_params")
        decode = {**body, "stream": True, "stream_options": {"include_usage": True}}
        if params:
            decode["kv_transfer_params"] = params
        async with self._session.post(
            self._decode, data=orjson.dumps(decode), headers=headers
        ) as stream:
            stream.raise_for_status()
            async for _chunk in stream.content.iter_any():
                pass

    async def close(self) -> None:
        await self._session.close()


class AdapterLegs:
    """The split's two legs through ``VllmBackend``, every frame taken."""

    def __init__(self, prefill: str, decode: str) -> None:
        self._prefill = VllmBackend("p0", prefill, {"model": _SERVED})
        self._decode = VllmBackend("d0", decode, {"model": _SERVED})

    async def start(self) -> None:
        await self._prefill.start()
        await self._decode.start()

    async def split(self, index: int) -> None:
        request = GenerationRequest(
            request_id=f"adapter-{index}",
            model=_SERVED,
            prompt=PROMPT,
            sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0, seed=index),
            prompt_tokens=len(PROMPT),
        )
        result = await self._prefill.prefill(request, 60.0)
        if result.handle is None:
            raise RuntimeError("the prefill fake kept no KV for a remote decode")
        frames = self._decode.decode(request, result.handle, result.first_token_id, 60.0)
        async for _frame in frames:
            pass

    async def close(self) -> None:
        await self._prefill.close()
        await self._decode.close()


async def _round(split: Callable[[int], Awaitable[None]], requests: int) -> tuple[float, float]:
    """(CPU, wall) microseconds a request over ``requests`` sequential splits."""
    for index in range(WARM_UP):
        await split(index)
    cpu, wall = time.process_time(), time.perf_counter()
    for index in range(requests):
        await split(index)
    return (
        (time.process_time() - cpu) / requests * 1e6,
        (time.perf_counter() - wall) / requests * 1e6,
    )


async def measure(requests: int, rounds: int) -> list[Figures]:
    with tempfile.TemporaryDirectory(prefix="bench-leg-cost-") as scratch:
        log_dir = Path(scratch)
        async with (
            peers.fake_engine_process("prefill", log_dir) as prefill,
            peers.fake_engine_process("decode", log_dir) as decode,
        ):
            bare = BareLegs(prefill.address, decode.address)
            adapter = AdapterLegs(prefill.address, decode.address)
            await adapter.start()
            systems = [(BARE, bare.split), (ADAPTER, adapter.split)]
            spells: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in systems}
            try:
                for index in range(rounds):
                    for name, split in systems if index % 2 == 0 else systems[::-1]:
                        spells[name].append(await _round(split, requests))
                    print(f"  round {index + 1}/{rounds}", flush=True)
            finally:
                await bare.close()
                await adapter.close()
    return figures(spells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.leg_cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="split requests a round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per system, in turns")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds take a positive count")
    started = time.perf_counter()
    found = uvloop.run(measure(args.requests, args.rounds))
    columns = ("system", "CPU us / request", f"over {BARE}", "wall us / request")
    grid = table(*columns, numeric=columns[1:])
    for f in found:
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        grid.add_row(f.name, f"{f.cpu_us_per_request:,.0f}", ratio, f"{f.wall_us_per_request:,.0f}")
    print(render(grid))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
