"""How the HTTP door's event stream reaches the socket: events queued before the task
waits go out together, in aiohttp's chunked framing, in order, and none is left queued
once the body has ended; a reader that left makes the next send raise.

A real aiohttp server on 127.0.0.1 port 0 runs a scripted handler; a raw socket reads
the bytes exactly as they were framed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from router.api.openai_http import StallBoundResponse

Script = Callable[[StallBoundResponse], Awaitable[None]]


@asynccontextmanager
async def serve(script: Script, seen: list[StallBoundResponse]) -> AsyncIterator[int]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = StallBoundResponse(30.0, lambda: None, headers={"X-Kind": "events"})
        seen.append(response)
        await response.prepare(request)
        await script(response)
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def fetch(port: int, version: str = "1.1") -> bytes:
    """The whole answer, head and body as framed; the server closes after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET / HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    return answer


def chunks(answer: bytes) -> list[bytes]:
    """The body's chunks in the order they were framed (the last, empty one included)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    found = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        found.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        body = rest[size + 2 :]
    return found


async def test_events_queued_before_the_task_waits_go_out_as_one_chunk() -> None:
    async def script(response: StallBoundResponse) -> None:
        await response.write(b"first\n")  # the head and the first event
        await response.send(b"a\n")
        await response.send(b"b\n")
        await asyncio.sleep(0)  # the task waits: what is queued goes out
        await response.send(b"c\n")
        await response.write_eof(b"end\n")  # takes what is queued, in order

    seen: list[StallBoundResponse] = []
    async with serve(script, seen) as port:
        answer = await fetch(port)
    assert chunks(answer) == [b"first\n", b"a\nb\n", b"c\nend\n", b""]
    assert seen[0].body_length == len(answer)  # all it wrote, as aiohttp counts it


async def test_a_plain_write_takes_what_is_queued_first() -> None:
    async def script(response: StallBoundResponse) -> None:
        await response.write(b"1")
        await response.send(b"2")
        await response.write(b"3")
        await response.write_eof()

    async with serve(script, []) as port:
        answer = await fetch(port)
    assert chunks(answer) == [b"1", b"23", b""]


async def test_http_1_0_gets_the_bytes_unframed() -> None:
    async def script(response: StallBoundResponse) -> None:
        await response.write(b"first\n")
        await response.send(b"a\n")
        await asyncio.sleep(0)
        await response.send(b"b\n")
        await response.write_eof(b"end\n")

    async with serve(script, []) as port:
        answer = await fetch(port, version="1.0")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    assert body == b"first\na\nb\nend\n"


async def test_a_send_after_the_reader_left_raises() -> None:
    started = asyncio.Event()
    gone = asyncio.Event()
    raised = asyncio.Event()

    async def script(response: StallBoundResponse) -> None:
        await response.write(b"first\n")
        started.set()
        await gone.wait()
        try:
            while True:  # until the server has seen the connection reset
                await response.send(b"x" * 100)
                await asyncio.sleep(0)
        except ConnectionResetError:
            raised.set()

    async with serve(script, []) as port:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await started.wait()
        # Linger 0: close sends a reset, which closes the server's transport.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        gone.set()
        async with asyncio.timeout(30):  # a guard against a hang, not a timing
            await raised.wait()


@pytest.mark.parametrize("size", [(1 << 16) + 1])
async def test_a_large_queue_is_written_at_once(size: int) -> None:
    async def script(response: StallBoundResponse) -> None:
        await response.write(b"h")
        await response.send(b"y" * size)  # over the limit: written before send returns
        await response.send(b"z")
        await response.write_eof()

    async with serve(script, []) as port:
        answer = await fetch(port)
    assert chunks(answer) == [b"h", b"y" * size, b"z", b""]
