"""What both doors do as a call comes in: check its bearer token, name its client,
and let the admission gate refuse it at once (a client over its cap of open streams
or its request rate, a request the queue would make late) before it may queue.

A token is accepted when the call carries exactly one ``authorization`` (gRPC
metadata) or ``Authorization`` header (HTTP), ``Bearer <token>``, and the token is
one of those configured. Several are refused, not resolved by taking one of them.
The comparison takes the same time whichever token matches, or none: each
configured token's digest is compared with ``hmac.compare_digest``, all of them.

A client is its bearer token when the router requires tokens (hashed: a refusal
or a log line never shows it), else its network address without the port: one
client's many connections count together. Behind a proxy every client has the
proxy's address, so the cap then holds for all of them together.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import Iterable, Iterator, Sequence

from backends.errors import OverloadedError
from router.dispatch.admission import ClientRate
from router.dispatch.dispatcher import Dispatcher
from router.scheduling.service_level import ServiceLevel
from router.settings import Settings


class BearerTokens:
    """The accepted bearer tokens; a door asks ``allows`` of each call's credentials."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in sorted(set(tokens)))

    def __bool__(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: Sequence[str]) -> bool:
        """Whether the call's ``authorization`` values are exactly one accepted
        ``Bearer <token>`` (the scheme in any case, as RFC 9110 has it)."""
        if len(authorization) != 1:
            return False
        token = bearer_token(authorization[0])
        digest = _digest(token or "")
        matched = False
        for expected in self._digests:  # every one: no early exit tells which matched
            matched |= hmac.compare_digest(digest, expected)
        return matched and token is not None


def bearer_token(authorization: str) -> str | None:
    """The token of ``Bearer <token>``; None for another scheme."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _digest(token: str) -> bytes:
    """Equal-length digests: compare_digest then also hides the tokens' lengths."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_client(authorization: str) -> str:
    """The client a bearer token names: one token is one client, however its header is
    spelled (``Bearer`` in another case does not make it another client)."""
    return "token:" + _digest(bearer_token(authorization) or "").hex()[:16]


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
    dispatcher: Dispatcher, settings: Settings, client: str, service: ServiceLevel, model: str
) -> Iterator[None]:
    """Holds the client's share of open streams while the block runs; raises
    OverloadedError (counted as a refused request) when the gate turns it away.
    ``model`` (a model the pool serves) labels what is refused."""
    slo = service.effective_slo(dispatcher.class_slo(service.slo_class))
    ttft_target_s = None if slo is None else slo.ttft_s
    gate = dispatcher.admission
    rate = ClientRate(settings.max_requests_per_s_per_client, settings.client_burst())
    labels = (model, service.slo_class)
    try:
        gate.check_door(
            client,
            service.priority,
            ttft_target_s,
            settings.max_streams_per_client,
            rate,
            labels=labels,
        )
    except OverloadedError:
        dispatcher.count_rejected("overloaded", model)
        raise
    with gate.client_stream(client, ttft_target_s, labels):
        yield
