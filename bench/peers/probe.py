"""When a streamed answer's head and its first event reach a client, with and without
the client acknowledging every segment at once.

Over one keep-alive connection (plain sockets, the request in one write, TCP_NODELAY),
``count`` sequential streamed completions are timed from sending to the first bytes (the
response head) and to the first ``data: {`` event. Then the same again with
``TCP_QUICKACK`` set before every read, so the client never delays an ACK.

A server that leaves Nagle's algorithm on (no TCP_NODELAY on the connections it accepts)
and writes the head and the first event separately holds the event back until the
client acknowledges the head; a Linux client delays that ACK by up to 40 ms on a
connection it keeps alive. Then the first event lags the head by about 40 ms, and by
almost nothing with quick ACKs: the lag is the server's, not the engine's behind it.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

from router.sim.metrics import percentile

_END = b"0\r\n\r\n"  # the last chunk of a chunked body


@dataclass(frozen=True)
class FirstEvent:
    head_p50_ms: float
    first_event_p50_ms: float
    quickack_first_event_p50_ms: float

    @property
    def held_ms(self) -> float:
        """How much later the first event comes unless the client ACKs at once."""
        return self.first_event_p50_ms - self.quickack_first_event_p50_ms

    def as_json(self) -> dict[str, float]:
        return {
            "head_p50_ms": round(self.head_p50_ms, 3),
            "first_event_p50_ms": round(self.first_event_p50_ms, 3),
            "quickack_first_event_p50_ms": round(self.quickack_first_event_p50_ms, 3),
            "held_ms": round(self.held_ms, 3),
        }


def _request(address: str, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: probe\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def _times(address: str, request: bytes, count: int, quickack: bool) -> tuple[float, float]:
    host, port = address.rsplit(":", 1)
    heads, events = [], []
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            connection.sendall(request)
            received, head_at, event_at = b"", None, None
            while not received.endswith(_END):
                if quickack:
                    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                chunk = connection.recv(65536)
                if not chunk:
                    raise ConnectionError(f"{address} closed the connection mid-answer")
                now = time.perf_counter()
                head_at = head_at or now
                received += chunk
                if event_at is None and b"data: {" in received:
                    event_at = now
            if event_at is None or head_at is None:
                raise ConnectionError(f"{address} sent no event")
            heads.append((head_at - started) * 1000)
            events.append((event_at - started) * 1000)
    return percentile(heads, 50), percentile(events, 50)


def first_event(address: str, path: str, body: dict[str, Any], count: int) -> FirstEvent:
    """Blocking: run it in a thread. The body must ask for a stream (chunked answer)."""
    request = _request(address, path, body)
    head, event = _times(address, request, count, quickack=False)
    _, quick_event = _times(address, request, count, quickack=True)
    return FirstEvent(head, event, quick_event)
