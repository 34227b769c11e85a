"""Moving a KV through the router: the one narrow interface a backend's transport implements.

Modelled on vLLM's ``KVConnectorBase_V1``: a backend that can hand the router the KV
of a handle it holds, or keep one the router hands it, offers a :class:`KVTransfer`
for its transport (``Backend.kv_transfer``). The router's relay (``router.handoff``)
knows this interface and nothing else; what a transport needs to find the bytes
(addresses, link speeds, ...) rides opaque in the handle's ``transport_params``.

Chunks cross as the transport's own encoding, so a relay between two backends of one
transport passes them on as the bytes they arrived as, never decoded or joined; a
layout conversion decodes them with :meth:`KVTransfer.decode_chunk` and encodes what
it writes with :meth:`KVTransfer.encode_chunk`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from backends.base import KVHandle


@dataclass(frozen=True)
class KVChunk:
    """Bytes ``offset`` to ``offset + len(data)`` of a handle's KV."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class DirectCopy:
    """A KV moved by a transport's own path between its two ends."""

    handle: KVHandle  # the sink's handle of it
    pieces: int  # the units it moved in (chunks, segments)


class KVTransfer(abc.ABC):
    """Reads the KV of handles one backend holds, and writes KV into it."""

    @abc.abstractmethod
    def read(
        self, handle: KVHandle, timeout_s: float, offset: int = 0, length: int = 0
    ) -> AsyncGenerator[bytes, None]:
        """The KV of ``handle`` (or bytes ``offset`` to ``offset + length`` of it), as
        encoded chunks for a ``write`` of the same transport."""

    @abc.abstractmethod
    async def write(
        self, handle: KVHandle, chunks: AsyncIterator[bytes], timeout_s: float
    ) -> KVHandle:
        """Keeps the KV of ``handle`` (held elsewhere) read as ``chunks``; its handle here."""

    @abc.abstractmethod
    def encode_chunk(self, chunk: KVChunk) -> bytes: ...

    @abc.abstractmethod
    def decode_chunk(self, encoded: bytes) -> KVChunk:
        """Raises ``BackendError`` for a chunk that arrived damaged."""

    async def copy(self, handle: KVHandle, sink: KVTransfer, *, depth: int) -> DirectCopy | None:
        """Moves the whole KV straight to ``sink`` when both ends share a faster path than
        chunks through ``read`` and ``write`` (at most ``depth`` units in flight); None
        when they do not, and the router then relays the chunks itself."""
        return None
