"""A plain-socket data plane for KV bytes, beside the gRPC control plane.

gRPC carries the control (Prefill, Decode, handles); a KV's bytes go over a plain
TCP connection, as NIXL and Mooncake keep bulk transfers off their RPC layer: in
Python a stream of 1 MiB gRPC messages reaches about a third of a socket's rate.

A request is ``G``, the request id's length (2 bytes) and the id, then the byte
offset and length (8 bytes each, big-endian). The answer is a status byte and a
length (8 bytes); on success the bytes follow, then the count of 1 MiB segments
(4 bytes) and the CRC-32 of each (4 bytes each), so a damaged segment is named;
on failure a message follows (2-byte length, UTF-8). One request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

SEGMENT_BYTES = 1 << 20
_OK, _NOT_FOUND, _OUT_OF_RANGE = 0, 1, 2
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


def segment_checksums(payload: bytes | bytearray) -> tuple[int, ...]:
    view = memoryview(payload)
    return tuple(
        zlib.crc32(view[i : i + SEGMENT_BYTES]) for i in range(0, len(view), SEGMENT_BYTES)
    )


Lookup = Callable[[str], Served | None]


class DataPlaneServer:
    """Serves byte ranges of the payloads ``lookup`` finds, straight from their buffers."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str) -> int:
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_id, offset, length = await _read_request(reader)
            served = self._lookup(request_id)
            if served is None:
                await _refuse(writer, _NOT_FOUND, f"no KV held for request {request_id}")
                return
            size = len(served.payload)
            end = offset + length if length else size
            if not offset <= end <= size:
                await _refuse(writer, _OUT_OF_RANGE, f"bytes {offset}..{end} of {size}")
                return
            # Checksums made with the payload save a pass over it; a range needs its own.
            known = served.segment_checksums if (offset, end) == (0, size) else None
            await _send(writer, memoryview(served.payload)[offset:end], known)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the reader went away; it will pull again or prefill itself
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, int, int]:
    op, id_length = struct.unpack(">cH", await reader.readexactly(3))
    if op != b"G":
        raise ConnectionError(f"unknown data plane request {op!r}")
    request_id = (await reader.readexactly(id_length)).decode()
    offset, length = struct.unpack(">QQ", await reader.readexactly(16))
    return request_id, offset, length


async def _refuse(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    text = message.encode()
    writer.write(struct.pack(">BQH", status, 0, len(text)) + text)
    await writer.drain()


async def _send(
    writer: asyncio.StreamWriter, view: memoryview, known: tuple[int, ...] | None
) -> None:
    writer.write(struct.pack(">BQ", _OK, len(view)))
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


def _checksums(segment: memoryview, running: int) -> tuple[int, int]:
    """The segment's CRC-32 and the running CRC-32 of everything up to it (off the event
    loop: zlib releases the GIL, so this overlaps the next segment's receive)."""
    return zlib.crc32(segment), zlib.crc32(segment, running)


async def fetch(address: str, request_id: str, into: bytearray, offset: int = 0) -> int:
    """Fills ``into`` with the payload's bytes from ``offset``, each segment checked.

    The bytes land straight in ``into`` (``recv_into``, no intermediate copies).
    Returns the CRC-32 of all of it, computed on the way.
    """
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.setblocking(False)
    try:
        try:
            await loop.sock_connect(connection, (host, int(port)))
        except OSError as error:
            raise DataPlaneError("UNAVAILABLE", f"data plane {address}: {error}") from error
        identifier = request_id.encode()
        await loop.sock_sendall(
            connection,
            struct.pack(">cH", b"G", len(identifier))
            + identifier
            + struct.pack(">QQ", offset, len(into)),
        )
        status, length = struct.unpack(">BQ", await _receive(loop, connection, 9))
        if status != _OK:
            (size,) = struct.unpack(">H", await _receive(loop, connection, 2))
            message = (await _receive(loop, connection, size)).decode(errors="replace")
            raise DataPlaneError(_STATUS_CODES.get(status, "UNKNOWN"), message)
        if length != len(into):
            raise DataPlaneError("DATA_LOSS", f"data plane sent {length} bytes, not {len(into)}")
        computed, running = await _receive_checked(loop, connection, memoryview(into))
        (count,) = struct.unpack(">I", await _receive(loop, connection, 4))
        expected = struct.unpack(f">{count}I", await _receive(loop, connection, 4 * count))
    except (ConnectionError, OSError) as error:
        raise DataPlaneError("UNAVAILABLE", f"data plane {address} broke off: {error}") from error
    finally:
        connection.close()
    for index, (got, sent) in enumerate(zip(computed, expected, strict=False)):
        if got != sent:
            raise DataPlaneError(
                "DATA_LOSS", f"KV segment at byte {index * SEGMENT_BYTES} failed its checksum"
            )
    if len(expected) != len(computed):
        raise DataPlaneError("DATA_LOSS", "KV segment checksums do not match the bytes sent")
    return running


async def _receive_checked(
    loop: asyncio.AbstractEventLoop, connection: socket.socket, view: memoryview
) -> tuple[list[int], int]:
    """Receives into ``view`` a segment at a time, checksumming each while the next arrives."""
    computed: list[int] = []
    running = 0
    pending: asyncio.Future[tuple[int, int]] | None = None
    for start in range(0, len(view), SEGMENT_BYTES):
        segment = view[start : start + SEGMENT_BYTES]
        await _receive_into(loop, connection, segment)
        if pending is not None:
            segment_crc, running = await pending
            computed.append(segment_crc)
        pending = loop.run_in_executor(None, _checksums, segment, running)
    if pending is not None:
        segment_crc, running = await pending
        computed.append(segment_crc)
    return computed, running


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
