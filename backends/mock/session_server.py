"""A device's side of a Session: many decode and generate streams over one RPC.

The streams run concurrently; one writer interleaves their frames, everything
ready at once going out in a single message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from backends._gen.hetero.device.v1 import device_pb2
from backends.mock import wire
from backends.mock.errors import DeviceError

# A stream's frames for the decode or generate request a SessionRequest carries.
OpenStream = Callable[[device_pb2.SessionRequest], AsyncGenerator[bytes, None]]


async def serve_session(
    requests: AsyncIterator[device_pb2.SessionRequest], open_stream: OpenStream
) -> AsyncIterator[bytes]:
    """The encoded SessionFrames of the streams ``requests`` open and cancel."""
    outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
    streams: dict[int, asyncio.Task[None]] = {}

    async def serve(stream_id: int, frames: AsyncGenerator[bytes, None]) -> None:
        code, message = 0, ""
        try:
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    outgoing.put_nowait(wire.session_frame(stream_id, frame))
        except DeviceError as error:
            code, message = grpc.StatusCode[error.code].value[0], error.message
        except asyncio.CancelledError:
            return  # the caller cancelled: it expects nothing more
        except Exception as error:  # noqa: BLE001  # a device bug ends one stream, not all
            code, message = grpc.StatusCode.INTERNAL.value[0], f"device error: {error}"
        finally:
            streams.pop(stream_id, None)
        outgoing.put_nowait(wire.session_status(stream_id, code, message))

    async def read() -> None:
        async for request in requests:
            if request.WhichOneof("body") == "cancel":
                task = streams.pop(request.stream_id, None)
                if task is not None:
                    task.cancel()
                continue
            streams[request.stream_id] = asyncio.create_task(
                serve(request.stream_id, open_stream(request))
            )
        # The caller closed its side: finish what is running, then end.
        await asyncio.gather(*streams.values(), return_exceptions=True)
        outgoing.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await outgoing.get()) is not None:
            # Everything ready goes in one message: one write per decode step,
            # not one per token.
            ready = [item]
            while not outgoing.empty() and (item := outgoing.get_nowait()) is not None:
                ready.append(item)
            yield wire.pack(ready)
            if item is None:
                break
    finally:
        reader.cancel()
        for task in list(streams.values()):
            task.cancel()
