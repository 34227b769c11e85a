"""Slow and greedy HTTP clients, at the connection: a cap on connections open at once,
and a deadline for a new connection's first request head.

aiohttp closes a connection idle between requests (its keep-alive timeout, which also
cuts one sending its next request head too slowly), but a fresh connection that never
finishes its first request head (slowloris) it would keep for as long. Each connection's
protocol is wrapped here: the wrapper starts a timer when the connection opens, the
HTTP server tells it (:meth:`ConnectionGuard.request_arrived`) when a request head has
been read, and the timer closes the connection if it fires first. A connection past the
cap is answered 503 and closed before aiohttp sees it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from router.logging import get_logger

log = get_logger(__name__)


def _busy_response() -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": "the router has too many connections open; retry shortly",
                "type": "unavailable",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _busy_response()


class ConnectionGuard:
    def __init__(self, header_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = 0  # connections counted against the cap

    def wrap(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that guards ``make``'s protocols."""
        return lambda: _GuardedConnection(self, make)

    @staticmethod
    def request_arrived(transport: asyncio.BaseTransport | None) -> None:
        """A complete request head came in on ``transport``: its deadline is met."""
        protocol = transport.get_protocol() if transport is not None else None
        if isinstance(protocol, _GuardedConnection):
            protocol.request_arrived()


class _GuardedConnection(asyncio.Protocol):
    """Passes every event on to the HTTP server's protocol, once the connection is
    admitted; until its first request head, a timer may close it."""

    def __init__(self, guard: ConnectionGuard, make: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make = make
        self._inner: asyncio.Protocol | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.max_connections:
            log.debug("refused a connection over the cap", max_connections=guard.max_connections)
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_BUSY)
            transport.close()
            return
        guard.open += 1
        self._deadline = asyncio.get_running_loop().call_later(
            guard.header_timeout_s, self._too_slow, transport
        )
        self._inner = self._make()
        self._inner.connection_made(transport)

    def request_arrived(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, transport: asyncio.BaseTransport) -> None:
        self._deadline = None
        log.debug("closed a connection with no request head in time", **_peer(transport))
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self.request_arrived()
        self._guard.open -= 1
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def _peer(transport: asyncio.BaseTransport) -> dict[str, str]:
    peer = transport.get_extra_info("peername")
    return {"peer": str(peer[0])} if isinstance(peer, tuple) and peer else {}
