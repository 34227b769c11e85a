"""What both doors do as a stream comes in: name its client, and let the admission
gate refuse it at once (a client over its cap of open streams, a request the queue
would make late) before it may queue.

A client is its bearer token when the router requires tokens (hashed: a refusal
or a log line never shows it), else its network address without the port: one
client's many connections count together. Behind a proxy every client has the
proxy's address, so the cap then holds for all of them together.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from backends.errors import OverloadedError
from router.dispatch.dispatcher import Dispatcher
from router.scheduling.service_level import ServiceLevel
from router.settings import Settings


def token_client(authorization: str) -> str:
    return "token:" + hashlib.sha256(authorization.encode()).hexdigest()[:16]


def grpc_peer_client(peer: str) -> str:
    """``ipv4:10.0.0.7:53211`` -> ``peer:10.0.0.7``; ``ipv6:[::1]:5`` -> ``peer:[::1]``."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rpartition(":")[0] or address
    return "peer:" + (address or peer or "unknown")


def http_peer_client(remote: str | None) -> str:
    return "peer:" + (remote or "unknown")


@contextlib.contextmanager
def through_the_door(
    dispatcher: Dispatcher, settings: Settings, client: str, service: ServiceLevel
) -> Iterator[None]:
    """Holds the client's share of open streams while the block runs; raises
    OverloadedError (counted as a refused request) when the gate turns it away."""
    slo = service.effective_slo(dispatcher.class_slo(service.slo_class))
    ttft_target_s = None if slo is None else slo.ttft_s
    gate = dispatcher.admission
    try:
        gate.check_door(client, service.priority, ttft_target_s, settings.max_streams_per_client)
    except OverloadedError:
        dispatcher.count_rejected("overloaded")
        raise
    with gate.client_stream(client, ttft_target_s):
        yield
