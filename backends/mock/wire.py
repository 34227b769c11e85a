"""The Session's wire format, read and written by hand on the hot path.

Every encoded ``SessionFrame`` starts with field 1, a fixed64 stream id: a
9-byte header a reader can route by. A ``SessionFrames`` message is those frames
one after another, each as field 1 (tag 0x0a) with a length. Walking that by
hand costs a few slices; decoding every frame would cost a message object each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from backends._gen.hetero.device.v1 import device_pb2

_STREAM_ID_TAG = b"\x09"  # SessionFrame.stream_id: field 1, fixed64
_FRAME_TAG = 0x12  # SessionFrame.frame: field 2, length-delimited
_ENTRY_TAG = b"\x0a"  # SessionFrames.frames: field 1, length-delimited
HEADER = 9


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(buffer: bytes, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    value = shift = 0
    while True:
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def session_frame(stream_id: int, frame: bytes) -> bytes:
    """An encoded SessionFrame carrying one token frame, built without a message object."""
    return b"".join(
        (_STREAM_ID_TAG, stream_id.to_bytes(8, "little"), bytes((_FRAME_TAG,)),
         encode_varint(len(frame)), frame)
    )  # fmt: skip


def session_status(stream_id: int, code: int, message: str) -> bytes:
    return device_pb2.SessionFrame(
        stream_id=stream_id, status=device_pb2.SessionStatus(code=code, message=message)
    ).SerializeToString()


def pack(frames: Sequence[bytes]) -> bytes:
    """A SessionFrames message of encoded SessionFrames."""
    parts: list[bytes] = []
    for frame in frames:
        parts += (_ENTRY_TAG, encode_varint(len(frame)), frame)
    return b"".join(parts)


def unpack(message: bytes) -> Iterator[tuple[int, bytes | None, device_pb2.SessionStatus | None]]:
    """(stream id, token frame or None, status or None) for each frame of a SessionFrames."""
    position, end = 0, len(message)
    while position < end:
        length, start = read_varint(message, position + 1)
        position = start + length
        stream_id = int.from_bytes(message[start + 1 : start + HEADER], "little")
        if message[start + HEADER] == _FRAME_TAG:
            size, first = read_varint(message, start + HEADER + 1)
            yield stream_id, message[first : first + size], None
        else:
            yield (
                stream_id,
                None,
                device_pb2.SessionFrame.FromString(message[start:position]).status,
            )
