"""Varints wider than their field, which protobuf's parser forgives and the router does not.

A parser keeps the low bits of a varint too wide for its field: a uint32 ``max_tokens``
sent as 2**32 + 4 reads as 4, an enum sent as 2**32 + 1 as 1, and a 64-bit seed sent in
ten bytes of 70 bits as its low 64. A client that sends such a value meant another
number than the one the router would serve, so the router refuses it. The walk runs on
bytes that parsed, so their structure is sound; it reads the values the parser dropped
bits of.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT32_MIN = -(2**31)
_INT32_LIMIT = 2**31
_UINT32_LIMIT = 2**32
_UINT64_LIMIT = 2**64
# The bits of each varint field type, and whether negative values are sign-extended to
# 64 bits on the wire (int32 and enums are).
_WIDTHS: dict[int, tuple[int, bool]] = {
    FieldDescriptor.TYPE_INT32: (32, True),
    FieldDescriptor.TYPE_ENUM: (32, True),
    FieldDescriptor.TYPE_UINT32: (32, False),
    FieldDescriptor.TYPE_SINT32: (32, False),
    FieldDescriptor.TYPE_INT64: (64, False),
    FieldDescriptor.TYPE_UINT64: (64, False),
    FieldDescriptor.TYPE_SINT64: (64, False),
    FieldDescriptor.TYPE_BOOL: (64, False),
}
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)


@dataclass(frozen=True)
class Overflow:
    """A varint that does not fit its field: the field's path (``sampling.max_tokens``),
    the value as sent, and the field's width in bits."""

    path: str
    value: int
    bits: int


def overflow(data: bytes, kind: type[Message]) -> Overflow | None:
    """The first varint in ``data``, a message of ``kind`` that parsed, too wide for its
    field; None when every value fits."""
    # The stubs also name upb's own class, which is this one at run time.
    descriptor = cast(Descriptor, kind.DESCRIPTOR)
    reader = _Reader(data)
    try:
        return _message(reader, len(data), descriptor, "")
    except IndexError:  # bytes that did not parse: the parser's verdict stands
        return None


def _fits(width: tuple[int, bool], value: int) -> bool:
    bits, sign_extended = width
    if bits == 64:
        return value < _UINT64_LIMIT
    if sign_extended:
        return value < _INT32_LIMIT or _UINT64_LIMIT + _INT32_MIN <= value < _UINT64_LIMIT
    return value < _UINT32_LIMIT


@dataclass(frozen=True)
class _Field:
    """What the walk needs of a field, read from its descriptor once."""

    name: str
    width: tuple[int, bool] | None  # its varint type's, from _WIDTHS; None: not checked
    packed: bool  # a repeated varint field, whose values may come in one length
    message: Descriptor | None


@functools.cache
def _fields(descriptor: Descriptor) -> dict[int, _Field]:
    """``descriptor``'s fields by number: looking them up on the descriptor at every
    field of every request costs more than the rest of the walk."""
    return {
        number: _Field(
            field.name,
            _WIDTHS.get(field.type),
            field.type in _WIDTHS and field.is_repeated,
            field.message_type,
        )
        for number, field in descriptor.fields_by_number.items()
    }


def _message(reader: _Reader, end: int, descriptor: Descriptor, prefix: str) -> Overflow | None:
    fields = _fields(descriptor)
    while reader.position < end:
        key = reader.varint()
        number, wire_type = key >> 3, key & 7
        known = fields.get(number)
        if known is None or wire_type not in (_VARINT, _LENGTH):
            reader.skip(wire_type)
            continue
        if wire_type == _VARINT:
            value = reader.varint()
            if known.width is not None and not _fits(known.width, value):
                return Overflow(prefix + known.name, value, known.width[0])
            continue
        length = reader.varint()
        stop = reader.position + length
        found = None
        if known.message is not None:
            found = _message(reader, stop, known.message, prefix + known.name + ".")
        elif known.packed and known.width is not None:
            while found is None and reader.position < stop:
                value = reader.varint()
                if not _fits(known.width, value):
                    found = Overflow(prefix + known.name, value, known.width[0])
        if found is not None:
            return found
        reader.position = stop
    return None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.data[self.position]
            self.position += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def skip(self, wire_type: int) -> None:
        """Steps over one value of ``wire_type`` (a whole group, nested ones included)."""
        if wire_type == _VARINT:
            self.varint()
        elif wire_type == _FIXED64:
            self.position += 8
        elif wire_type == _LENGTH:
            length = self.varint()
            self.position += length
        elif wire_type == _FIXED32:
            self.position += 4
        elif wire_type == _START_GROUP:
            depth = 1
            while depth:
                inner = self.varint() & 7
                depth += {_START_GROUP: 1, _END_GROUP: -1}.get(inner, 0)
                if inner not in (_START_GROUP, _END_GROUP):
                    self.skip(inner)
        else:  # an end of group with no start, or a wire type that does not exist
            raise IndexError(f"wire type {wire_type} out of place")
