"""The router's end of a device Session: many requests over one long-lived stream.

A reader task routes each incoming frame to its request by the stream id in the
frame's fixed 9-byte header, without decoding the frame (``wire``). Frames wait in a
per-request inbox; a consumer that fell behind takes them all at once,
coalesced into one message. An inbox holds at most a request's own output (its
max_tokens), so a slow client never stalls the shared stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from backends._gen.hetero.device.v1 import device_pb2
from backends.frames import coalesce
from backends.mock import wire

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class SessionStreamError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _Inbox:
    __slots__ = ("frames", "status", "waiter")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter
        self.waiter = None


class DeviceSession:
    def __init__(self, channel: grpc.aio.Channel, method: str) -> None:
        self._open = channel.stream_stream(
            method,
            request_serializer=device_pb2.SessionRequest.SerializeToString,
            response_deserializer=None,
        )
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._inboxes: dict[int, _Inbox] = {}
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def stream(
        self, body: str, message: Any, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        """Sends one request (``body`` names the oneof field) and yields its frames."""
        call = self._ensure_open()
        stream_id = next(self._ids)
        inbox = _Inbox()
        self._inboxes[stream_id] = inbox
        ended = False
        try:
            async with asyncio.timeout(timeout_s):
                await self._write(
                    call, device_pb2.SessionRequest(stream_id=stream_id, **{body: message})
                )
                while True:
                    if not inbox.frames and inbox.status is None:
                        await inbox.wait()
                    if inbox.frames:
                        frames, inbox.frames = inbox.frames, []
                        yield coalesce(frames)
                        continue
                    if inbox.status is None:
                        continue  # woken with nothing new
                    ended = True
                    code, details = inbox.status
                    if code is not grpc.StatusCode.OK:
                        raise SessionStreamError(code, details)
                    return
        except TimeoutError:
            raise SessionStreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            ) from None
        finally:
            self._inboxes.pop(stream_id, None)
            if not ended:
                self._cancel_later(call, stream_id)

    def _ensure_open(self) -> Any:
        if self._call is None:
            self._call = self._open()
            self._reader = asyncio.create_task(self._read(self._call))
        return self._call

    async def _write(self, call: Any, request: device_pb2.SessionRequest) -> None:
        try:
            async with self._write_lock:
                await call.write(request)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as error:
            # The session broke between the last read and this write: the next
            # request opens a new one.
            if self._call is call:
                self._call = None
            raise SessionStreamError(
                grpc.StatusCode.UNAVAILABLE, f"device session closed: {error}"
            ) from None

    def _cancel_later(self, call: Any, stream_id: int) -> None:
        """Tells the device to stop; from a task, since a closing generator cannot wait."""
        if call is not self._call:
            return  # that session is gone, and the device dropped its work with it

        async def cancel() -> None:
            with contextlib.suppress(SessionStreamError):
                await self._write(
                    call,
                    device_pb2.SessionRequest(
                        stream_id=stream_id, cancel=device_pb2.SessionCancel()
                    ),
                )

        task = asyncio.create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read(self, call: Any) -> None:
        failure = (grpc.StatusCode.UNAVAILABLE, "device session closed")
        try:
            async for message in call:
                for stream_id, frame, status in wire.unpack(message):
                    inbox = self._inboxes.get(stream_id)
                    if inbox is None:
                        continue  # a stream the caller gave up on
                    if frame is not None:
                        inbox.frames.append(frame)
                    elif status is not None:
                        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
                        inbox.status = (code, status.message)
                    inbox.wake()
        except grpc.aio.AioRpcError as error:
            failure = (error.code(), f"device session failed: {error.details()}")
        except asyncio.CancelledError:
            pass
        finally:
            if self._call is call:
                self._call = None  # the next request opens a new session
            for inbox in self._inboxes.values():
                if inbox.status is None:
                    inbox.status = failure
                    inbox.wake()
