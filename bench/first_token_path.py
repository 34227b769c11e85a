"""python -m bench.first_token_path: where the HTTP door's time to the first token goes.

One request at a time through the HTTP door (``vllm`` adapter, split forced) over the
two zero-cost fake engines of scenario ``peers``. The router runs instrumented: this
module is its entry point, and before the router starts it wraps the methods at the
seams of a request's path (``instrument``) so that each records the moment it is
entered or left, with nothing else changed. Each request's moments, from its bytes
arriving to its first event handed to the socket, cut its time to the first token
into segments (``SEGMENTS``); the figure is each segment's median over ``--requests``
requests, and the sum of those that are the router's own work. The other segments are
the legs' round trips (the engine's time and aiohttp's client) and the wait for the
decode engine's first event, which a relay pays alike. The client's time to the first
token through the door and straight to the decode fake are printed beside them: their
difference is the added TTFT of ``bench.door_cost --sequential``.

This is what to read when the added TTFT moves: which segment grew. The probes cost a
few microseconds a request: a wrapper call at each seam, 0.4-0.6 us each timed alone.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import FIXED_LIMIT, router_server
from bench.scenarios import peers
from router.sim.metrics import percentile

MARKS_ENV = "BENCH_FIRST_TOKEN_MARKS"  # where the instrumented router writes its requests
WARM_UP = 50  # requests sent first and not counted: connections, caches, first imports

# The moments of one request, in the order they happen.
MOMENTS = (
    "in",  # the request's first bytes reach the door's protocol
    "body",  # the handler starts reading the body
    "body read",
    "parse",
    "parsed",
    "schedule",
    "scheduled",
    "prefill POST",  # the adapter starts the prefill leg's POST
    "prefill answered",  # its answer's head has arrived
    "decode POST",
    "decode answered",
    "decode body",  # the decode answer's first body bytes reach the SSE parser
    "first event out",  # the door has handed the first event (and the head) to the socket
)


@dataclass(frozen=True)
class Segment:
    name: str
    router: bool  # the router's own work, or the legs' round trips and the engine's wait


SEGMENTS = (
    Segment("aiohttp's request parsing, the middlewares", True),
    Segment("reading the body", True),
    Segment("the body's JSON", True),
    Segment("parsing and validating the request", True),
    Segment("admission, the request's features", True),
    Segment("scheduling", True),
    Segment("the attempt's and the prefill leg's set-up", True),
    Segment("the prefill leg's round trip (engine, aiohttp client)", False),
    Segment("the prefill answer, the decode leg's set-up", True),
    Segment("the decode leg's round trip to its head", False),
    Segment("the decode engine's first event", False),
    Segment("SSE, frames, the dispatcher, the door's event", True),
)


def segments(marks: Sequence[tuple[str, int]]) -> list[float] | None:
    """One request's moments (name, nanoseconds) as the microseconds of each segment;
    None unless every moment of ``MOMENTS`` is there, in order (a later repeat of a
    moment, such as a second write, is ignored)."""
    at: dict[str, int] = {}
    for name, ns in marks:
        at.setdefault(name, ns)
    if any(name not in at for name in MOMENTS):
        return None
    times = [at[name] for name in MOMENTS]
    if any(later < earlier for earlier, later in itertools.pairwise(times)):
        return None
    return [(later - earlier) / 1000 for earlier, later in itertools.pairwise(times)]


def medians(requests: Sequence[Sequence[float]]) -> list[float]:
    """Each segment's median over the requests."""
    return [statistics.median(column) for column in zip(*requests, strict=True)]


def p99s(requests: Sequence[Sequence[float]]) -> list[float]:
    """Each segment's 99th percentile over the requests, as the scenarios compute one."""
    return [percentile(column, 99) for column in zip(*requests, strict=True)]


# --- inside the router -----------------------------------------------------------------


class _Recorder:
    """The moments of the request in flight (one at a time) and the segments of those
    before it."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, int]] = []
        self.requests: list[list[float]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter_ns()))

    def begin(self) -> None:
        self.close()
        self.mark("in")

    def close(self) -> None:
        if self.marks and (cut := segments(self.marks)) is not None:
            self.requests.append(cut)
        self.marks = []

    def has(self, name: str) -> bool:
        return any(mark == name for mark, _ in self.marks)


def instrument(recorder: _Recorder) -> Callable[[], None]:
    """Wraps the seams of a request's path so that they mark ``recorder``; returns what
    undoes it. Every wrapped method must exist: a renamed one fails here, not silently."""
    from backends import http_common, vllm  # noqa: PLC0415  # the router's modules, loaded only to instrument them
    from router.api import connection_guard, openai_http  # noqa: PLC0415  # as above
    from router.dispatch import dispatcher  # noqa: PLC0415  # as above

    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, wrapper: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)  # AttributeError for a seam that moved
        setattr(owner, name, functools.wraps(original)(wrapper(original)))
        undo.append(lambda: setattr(owner, name, original))

    def around(start: str, end: str, is_async: bool) -> Callable[[Any], Any]:
        def wrapper(original: Any) -> Any:
            if is_async:

                async def marked_async(*args: Any, **kwargs: Any) -> Any:
                    recorder.mark(start)
                    try:
                        return await original(*args, **kwargs)
                    finally:
                        recorder.mark(end)

                return marked_async

            def marked(*args: Any, **kwargs: Any) -> Any:
                recorder.mark(start)
                try:
                    return original(*args, **kwargs)
                finally:
                    recorder.mark(end)

            return marked

        return wrapper

    def arrival(original: Any) -> Any:
        def data_received(self: Any, data: bytes) -> Any:
            if data.startswith(b"POST "):
                recorder.begin()
            return original(self, data)

        return data_received

    def first_feed(original: Any) -> Any:
        def feed(self: Any, chunk: bytes, **kwargs: Any) -> Any:
            if chunk and recorder.has("decode answered") and not recorder.has("decode body"):
                recorder.mark("decode body")
            return original(self, chunk, **kwargs)

        return feed

    def leg_answered(original: Any) -> Any:
        async def post(*args: Any, **kwargs: Any) -> Any:
            name = "decode POST" if recorder.has("prefill POST") else "prefill POST"
            recorder.mark(name)
            try:
                return await original(*args, **kwargs)
            finally:
                recorder.mark(name.replace("POST", "answered"))

        return post

    def first_write(original: Any) -> Any:
        async def write(self: Any, data: bytes) -> Any:
            try:
                return await original(self, data)
            finally:
                recorder.mark("first event out")

        return write

    # The router's HTTP connections only (not an engine's in the same process).
    patch(connection_guard._GuardedConnection, "data_received", arrival)  # noqa: SLF001  # a bench's probe
    patch(openai_http.OpenAIRoutes, "_read_body", around("body", "body read", True))
    patch(openai_http.OpenAIRoutes, "_parse", around("parse", "parsed", False))
    patch(dispatcher.Dispatcher, "_schedule", around("schedule", "scheduled", False))
    patch(vllm.VllmBackend, "_post", leg_answered)
    patch(http_common._SSEParser, "feed", first_feed)  # noqa: SLF001  # a bench's probe
    patch(openai_http.StallBoundResponse, "write", first_write)

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def serve_instrumented(argv: Sequence[str]) -> int:
    """The router's own entry point (``router.cli``), instrumented; its requests'
    segments go to the file ``MARKS_ENV`` names when the process exits."""
    from router import cli  # noqa: PLC0415  # loaded in the router's process only

    recorder = _Recorder()
    instrument(recorder)
    out = os.environ.get(MARKS_ENV)

    def write() -> None:
        recorder.close()
        if out:
            Path(out).write_text(json.dumps(recorder.requests))

    atexit.register(write)
    return cli.main(list(argv))


# --- the bench's side ------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    segments: list[float]  # medians, as SEGMENTS
    tails: list[float]  # 99th percentiles, as SEGMENTS
    requests: int
    ttft_ms: float  # the client's, through the door
    direct_ttft_ms: float  # the client's, straight to the decode fake
    ttft_p99_ms: float
    direct_ttft_p99_ms: float

    @property
    def router_us(self) -> float:
        return sum(us for us, seg in zip(self.segments, SEGMENTS, strict=True) if seg.router)


async def _ttfts(client: peers.HttpClient, count: int) -> list[float]:
    return [await client.ttft_ms() for _ in range(count)]


async def measure(requests: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="bench-first-token-") as scratch:
        folder = Path(scratch)
        marks = folder / "marks.json"
        async with (
            peers.fake_engine_process("prefill", folder) as prefill,
            peers.fake_engine_process("decode", folder) as decode,
        ):
            environment = {**FIXED_LIMIT, MARKS_ENV: str(marks)}
            pool = peers.fake_pool(prefill, decode)
            async with router_server(pool, environment, module="bench.first_token_path") as router:
                body = {**peers.BODY, "disaggregation": "split"}
                door = peers.HttpClient(f"http://{router.http_address}/v1/completions", body)
                direct = peers.HttpClient(f"http://{decode.address}/v1/completions", peers.BODY)
                try:
                    await _ttfts(door, WARM_UP)
                    through = await _ttfts(door, requests)
                    await _ttfts(direct, WARM_UP)
                    straight = await _ttfts(direct, requests)
                finally:
                    await door.close()
                    await direct.close()
        recorded: list[list[float]] = json.loads(marks.read_text())
    counted = recorded[WARM_UP:]
    if not counted:
        raise RuntimeError("the router recorded no request with every moment")
    return Figures(
        medians(counted),
        p99s(counted),
        len(counted),
        statistics.median(through),
        statistics.median(straight),
        percentile(through, 99),
        percentile(straight, 99),
    )


def report(figures: Figures) -> Iterator[str]:
    width = max(len(segment.name) for segment in SEGMENTS)
    yield f"  {'segment of the time to the first token':<{width}}   median us   p99 us   whose"
    yield "  " + "─" * (width + 35)
    rows = zip(figures.segments, figures.tails, SEGMENTS, strict=True)
    for us, tail, segment in rows:
        whose = "router" if segment.router else "legs"
        yield f"  {segment.name:<{width}}   {us:9.1f}   {tail:6.0f}   {whose}"
    yield f"  {'the router own, in all':<{width}}   {figures.router_us:9.1f}"
    added = figures.ttft_ms - figures.direct_ttft_ms
    added_p99 = figures.ttft_p99_ms - figures.direct_ttft_p99_ms
    yield (
        f"  client TTFT through the door p50 {figures.ttft_ms:.3f} ms, p99 "
        f"{figures.ttft_p99_ms:.3f}; straight to the decode fake p50 "
        f"{figures.direct_ttft_ms:.3f}, p99 {figures.direct_ttft_p99_ms:.3f}"
    )
    yield f"  added: p50 {added:.3f} ms, p99 {added_p99:.3f} ms ({figures.requests} requests)"


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["serve"]:  # the router's process (bench.processes.router_server)
        sys.exit(serve_instrumented(arguments))
    parser = argparse.ArgumentParser(prog="python -m bench.first_token_path", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="counted, one at a time")
    options = parser.parse_args(arguments)
    if options.requests < 1:
        parser.error("--requests must be at least 1")
    started = time.monotonic()
    figures = asyncio.run(measure(options.requests))
    for line in report(figures):
        print(line)
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
