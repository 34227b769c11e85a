"""A plain-socket data plane for KV bytes, beside the gRPC control plane.

gRPC carries the control (Prefill, Decode, handles); a KV's bytes go over a plain
TCP connection, as NIXL and Mooncake keep bulk transfers off their RPC layer: in
Python a stream of 1 MiB gRPC messages reaches about a third of a socket's rate.

A request is ``G``, the request id's length (2 bytes) and the id (UTF-8), the
lease token's length (1 byte) and the token (the handle's ``lease_token``, ASCII
hex), then the byte offset and length (8 bytes each; every integer is big-endian).
A KV is served only for its id and token together: a wrong or missing token is
answered as an unknown id is, not found, and the message names neither. The
answer is a status byte and a length (8 bytes); on success the CRC-32 of the whole
payload (4 bytes; 0 for a range) and the bytes follow, then the count of 1 MiB
segments (4 bytes) and the CRC-32 of each (4 bytes each), so a damaged segment is
named; on failure a message follows (2-byte length, UTF-8). A push (``P``, below)
is how a relay hands a KV to a decode device. Any other first byte closes the
connection unanswered. One request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from backends.mock.protocol import KV_CHUNK_BYTES

SEGMENT_BYTES = KV_CHUNK_BYTES
_OK, _NOT_FOUND, _OUT_OF_RANGE, _REFUSED = 0, 1, 2, 3
_STATUS_CODES = {_NOT_FOUND: "NOT_FOUND", _OUT_OF_RANGE: "OUT_OF_RANGE"}


class DataPlaneError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # a gRPC status name: NOT_FOUND, DATA_LOSS, UNAVAILABLE, ...
        self.message = message


@dataclass(frozen=True)
class Served:
    """A payload and, when known ahead, the CRC-32 of each of its segments."""

    payload: bytes | bytearray
    segment_checksums: tuple[int, ...] | None = None
    checksum: int = 0  # CRC-32 of the whole payload, sent so a reader can match its handle
    # Fault injection: the connection dies after this many bytes (0: never), as when
    # the holder's process is killed mid-transfer.
    break_after: int = 0


def segment_checksums(payload: bytes | bytearray) -> tuple[int, ...]:
    view = memoryview(payload)
    return tuple(
        zlib.crc32(view[i : i + SEGMENT_BYTES]) for i in range(0, len(view), SEGMENT_BYTES)
    )


# (request id, lease token) -> the payload, or None when no lease has both
Lookup = Callable[[str, bytes], Served | None]
_GET, _PUSH = b"G", b"P"
_MAX_ID_BYTES, _MAX_TOKEN_BYTES = 0xFFFF, 0xFF  # what their length fields can say
_NOT_HELD = "no KV held under this request id and token (expired, released or never made)"


class Sink(Protocol):
    """Where pushed KV goes (a decode device)."""

    def prepare(self, handle: bytes) -> None:
        """Refuses (DataPlaneError) a KV it cannot take, before any byte is kept."""

    async def accept(
        self, handle: bytes, payload: bytearray, segments: tuple[int, ...], checksum: int
    ) -> bytes:
        """Keeps a KV whose every segment arrived and matched ``segments`` (``checksum``:
        the holder's CRC-32 of the whole); returns its handle here, encoded."""
        ...


class DataPlaneServer:
    """Serves byte ranges of the payloads ``lookup`` finds, straight from their buffers."""

    def __init__(self, lookup: Lookup, sink: Sink | None = None) -> None:
        self._lookup = lookup
        self._sink = sink
        self._server: asyncio.Server | None = None
        self.port = 0
        self.bytes_sent = 0  # payload bytes served, whole or as ranges

    async def start(self, host: str) -> int:
        # A large stream limit: the reader pauses the socket above twice the limit.
        self._server = await asyncio.start_server(self._serve, host, 0, limit=4 * SEGMENT_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            op = await reader.readexactly(1)
            if op == _PUSH:
                await self._take(reader, writer)
                return
            if op != _GET:
                return
            request_id, token, offset, length = await _read_request(reader)
            served = self._lookup(request_id, token)
            if served is None:
                await _refuse(writer, _NOT_FOUND, _NOT_HELD)
                return
            size = len(served.payload)
            end = offset + length if length else size
            if not offset <= end <= size:
                await _refuse(writer, _OUT_OF_RANGE, f"bytes {offset}..{end} of {size}")
                return
            # Checksums made with the payload save a pass over it; a range needs its own.
            whole = (offset, end) == (0, size)
            known = served.segment_checksums if whole else None
            checksum = served.checksum if whole else 0
            view = memoryview(served.payload)[offset:end]
            if served.break_after:
                writer.write(struct.pack(">BQI", _OK, len(view), checksum))
                self.bytes_sent += len(view[: served.break_after])
                writer.write(view[: served.break_after])
                await writer.drain()
                writer.transport.abort()
                return
            # Counted as the bytes go to the writer, before the reader can have them.
            self.bytes_sent += len(view)
            await _send(writer, view, known, checksum)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the reader went away; it will pull again or prefill itself
        finally:
            writer.close()

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A pushed KV: ``P``, the handle (4-byte length, then it), the byte length, the
        bytes, the segment checksums; answered like a fetch, the new handle as payload."""
        (size,) = struct.unpack(">I", await reader.readexactly(4))
        handle = await reader.readexactly(size)
        length, checksum = struct.unpack(">QI", await reader.readexactly(12))
        try:
            if self._sink is None:
                raise DataPlaneError("FAILED_PRECONDITION", "this device takes no pushed KV")
            self._sink.prepare(handle)
            payload = bytearray(length)

            async def fill(segment: memoryview) -> None:
                segment[:] = await reader.readexactly(len(segment))

            computed = await _fill_checked(fill, memoryview(payload))
            (count,) = struct.unpack(">I", await reader.readexactly(4))
            expected = struct.unpack(f">{count}I", await reader.readexactly(4 * count))
            _compare(computed, expected)
            answer = await self._sink.accept(handle, payload, expected, checksum)
        except DataPlaneError as error:
            await _refuse(writer, _REFUSED, f"{error.code} {error.message}")
            return
        writer.write(struct.pack(">BQ", _OK, len(answer)) + answer)
        await writer.drain()


async def _fill_checked(
    fill: Callable[[memoryview], Awaitable[None]], view: memoryview
) -> list[int]:
    """Fills ``view`` a segment at a time, checksumming each while the next arrives."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[int]] = []
    for start in range(0, len(view), SEGMENT_BYTES):
        segment = view[start : start + SEGMENT_BYTES]
        await fill(segment)
        pending.append(loop.run_in_executor(None, _checksum, segment))
    return list(await asyncio.gather(*pending))


def _compare(computed: list[int], expected: tuple[int, ...]) -> None:
    for index, (got, sent) in enumerate(zip(computed, expected, strict=False)):
        if got != sent:
            raise DataPlaneError(
                "DATA_LOSS", f"KV segment at byte {index * SEGMENT_BYTES} failed its checksum"
            )
    if len(expected) != len(computed):
        raise DataPlaneError("DATA_LOSS", "KV segment checksums do not match the bytes sent")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, bytes, int, int]:
    (id_length,) = struct.unpack(">H", await reader.readexactly(2))
    # An id that is not UTF-8 names no lease: it is looked up, and not found, as it is.
    request_id = (await reader.readexactly(id_length)).decode(errors="replace")
    (token_length,) = struct.unpack(">B", await reader.readexactly(1))
    token = await reader.readexactly(token_length)
    offset, length = struct.unpack(">QQ", await reader.readexactly(16))
    return request_id, token, offset, length


async def _refuse(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    text = message.encode()
    writer.write(struct.pack(">BQH", status, 0, len(text)) + text)
    await writer.drain()


async def _send(
    writer: asyncio.StreamWriter, view: memoryview, known: tuple[int, ...] | None, checksum: int
) -> None:
    writer.write(struct.pack(">BQI", _OK, len(view), checksum))
    checksums = []
    for start in range(0, len(view), SEGMENT_BYTES):
        segment = view[start : start + SEGMENT_BYTES]
        if known is None:
            checksums.append(zlib.crc32(segment))
        writer.write(segment)  # no copy: the transport keeps a view until sent
        await writer.drain()
    checksums = list(known) if known is not None else checksums
    writer.write(struct.pack(f">I{len(checksums)}I", len(checksums), *checksums))
    await writer.drain()


def _checksum(segment: memoryview) -> int:
    """A segment's CRC-32, off the event loop: zlib releases the GIL, so this overlaps
    the next segment's receive."""
    return zlib.crc32(segment)


async def fetch(
    address: str, request_id: str, token: str, into: bytearray, offset: int = 0
) -> tuple[int, tuple[int, ...]]:
    """Fills ``into`` with the payload's bytes from ``offset``, each segment checked.

    The bytes land straight in ``into`` (``recv_into``, no intermediate copies). The
    transfer as a whole is checked by its segments: every one arrived, in number and
    in content, against the CRC-32s the holder made with the payload. Returns the
    holder's CRC-32 of the whole payload (0 for a range) and the segments'.
    """
    loop = asyncio.get_running_loop()
    connection = await _connect(loop, address)
    try:
        await loop.sock_sendall(connection, _get_request(request_id, token, offset, len(into)))
        length = await _answer(loop, connection)
        if length != len(into):
            raise DataPlaneError("DATA_LOSS", f"data plane sent {length} bytes, not {len(into)}")
        (whole,) = struct.unpack(">I", await _receive(loop, connection, 4))

        async def fill(segment: memoryview) -> None:
            await _receive_into(loop, connection, segment)

        computed = await _fill_checked(fill, memoryview(into))
        (count,) = struct.unpack(">I", await _receive(loop, connection, 4))
        expected = struct.unpack(f">{count}I", await _receive(loop, connection, 4 * count))
    except (ConnectionError, OSError) as error:
        raise DataPlaneError("UNAVAILABLE", f"data plane {address} broke off: {error}") from error
    finally:
        connection.close()
    _compare(computed, expected)
    return whole, expected


async def _receive_into(
    loop: asyncio.AbstractEventLoop, connection: socket.socket, view: memoryview
) -> None:
    while view:
        count = await loop.sock_recv_into(connection, view)
        if count == 0:
            raise ConnectionError("closed before the end of the payload")
        view = view[count:]


async def _receive(loop: asyncio.AbstractEventLoop, connection: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    await _receive_into(loop, connection, memoryview(buffer))
    return bytes(buffer)


def _get_request(request_id: str, token: str, offset: int, length: int) -> bytes:
    identifier = request_id.encode()
    secret = token.encode()
    if len(identifier) > _MAX_ID_BYTES or len(secret) > _MAX_TOKEN_BYTES:
        raise DataPlaneError("INVALID_ARGUMENT", "request id or lease token too long to send")
    return (
        struct.pack(">cH", _GET, len(identifier))
        + identifier
        + struct.pack(">B", len(secret))
        + secret
        + struct.pack(">QQ", offset, length)
    )


async def _answer(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> int:
    """The length an answer announces, or the refusal it carries raised."""
    status, length = struct.unpack(">BQ", await _receive(loop, connection, 9))
    if status != _OK:
        (size,) = struct.unpack(">H", await _receive(loop, connection, 2))
        message = (await _receive(loop, connection, size)).decode(errors="replace")
        raise _refusal(status, message)
    return int(length)


def _refusal(status: int, message: str) -> DataPlaneError:
    if status == _REFUSED:
        code, _, text = message.partition(" ")
        return DataPlaneError(code, text)
    return DataPlaneError(_STATUS_CODES.get(status, "UNKNOWN"), message)


async def _connect(loop: asyncio.AbstractEventLoop, address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.setblocking(False)
    try:
        await loop.sock_connect(connection, (host, int(port)))
    except OSError as error:
        connection.close()
        raise DataPlaneError("UNAVAILABLE", f"data plane {address}: {error}") from error
    return connection


async def relay(
    source: str,
    request_id: str,
    sink: str,
    handle: bytes,
    length: int,
    *,
    token: str,
    depth: int = 4,
) -> bytes:
    """Moves a KV from the data plane at ``source`` (read with its lease ``token``) to the
    one at ``sink``.

    The bytes go socket to socket through ``depth`` buffers of one segment, reused:
    received with ``recv_into``, sent from the same memory, never joined, never
    decoded. The segment checksums pass through for the sink to check. Returns the
    sink's answer (its handle of the KV, encoded).
    """
    loop = asyncio.get_running_loop()
    reader = await _connect(loop, source)
    try:
        writer = await _connect(loop, sink)
    except DataPlaneError:
        reader.close()
        raise
    try:
        await loop.sock_sendall(reader, _get_request(request_id, token, 0, 0))
        size = await _answer(loop, reader)
        if size != length:
            raise DataPlaneError("DATA_LOSS", f"source holds {size} bytes, not {length}")
        whole = await _receive(loop, reader, 4)  # passed on for the sink to match its handle
        await loop.sock_sendall(
            writer,
            _PUSH + struct.pack(">I", len(handle)) + handle + struct.pack(">Q", length) + whole,
        )
        await _pipe(loop, reader, writer, length, depth)
        (count,) = struct.unpack(">I", await _receive(loop, reader, 4))
        checksums = await _receive(loop, reader, 4 * count)
        await loop.sock_sendall(writer, struct.pack(">I", count) + checksums)
        return await _receive(loop, writer, await _answer(loop, writer))
    except (ConnectionError, OSError) as error:
        raise DataPlaneError("UNAVAILABLE", f"data plane relay broke off: {error}") from error
    finally:
        reader.close()
        writer.close()


async def _pipe(
    loop: asyncio.AbstractEventLoop,
    reader: socket.socket,
    writer: socket.socket,
    length: int,
    depth: int,
) -> None:
    """Receives and sends at once through ``depth`` reused segment buffers."""
    free: asyncio.Queue[bytearray] = asyncio.Queue()
    for _ in range(depth):
        free.put_nowait(bytearray(SEGMENT_BYTES))
    filled: asyncio.Queue[tuple[bytearray, int] | None] = asyncio.Queue()

    async def receive() -> None:
        for start in range(0, length, SEGMENT_BYTES):
            size = min(SEGMENT_BYTES, length - start)
            buffer = await free.get()
            await _receive_into(loop, reader, memoryview(buffer)[:size])
            filled.put_nowait((buffer, size))
        filled.put_nowait(None)

    receiving = asyncio.create_task(receive())
    try:
        while (item := await filled.get()) is not None:
            buffer, size = item
            await loop.sock_sendall(writer, memoryview(buffer)[:size])
            free.put_nowait(buffer)
        await receiving
    finally:
        receiving.cancel()
