"""Why a door cannot listen on its address, said in one line before its server tries.

grpc answers a failed bind with "Failed to bind to address" and prints its own
multi-line log; aiohttp with errno text. Binding a plain socket first, as the server
would (SO_REUSEADDR, no SO_REUSEPORT), tells the reason: the address is in use
(another router, or anything else), not on this machine, or a privileged port.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Any

_REASONS = {
    errno.EADDRINUSE: "address in use",
    errno.EADDRNOTAVAIL: "no such address on this machine",
    errno.EACCES: "permission denied (a port below 1024 needs privileges)",
}


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 host in brackets) as the host and port to bind."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def check_can_listen(address: str, door: str) -> None:
    """OSError ``cannot listen on ADDR for DOOR: REASON`` when a server could not
    bind ``address`` now; port 0 (any free port) is left to the server."""
    host, port = split_address(address)
    if port == 0:
        return
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise OSError(f"cannot listen on {address} for {door}: unknown host") from None
    failures = [
        _bind_error(family, kind, protocol, where) for family, kind, protocol, _, where in resolved
    ]
    reasons = [reason for reason in failures if reason is not None]
    # A server binds what it can of a name's addresses (localhost without IPv6): one
    # missing is no failure, one taken is (the port would be shared).
    taken = [reason for reason in reasons if reason != _REASONS[errno.EADDRNOTAVAIL]]
    if taken or (reasons and len(reasons) == len(failures)):
        raise OSError(f"cannot listen on {address} for {door}: {(taken or reasons)[0]}")


def _bind_error(family: int, kind: int, protocol: int, where: tuple[Any, ...]) -> str | None:
    """Why binding ``where`` fails now, as a server binds it; None when it works."""
    try:
        with contextlib.closing(socket.socket(family, kind, protocol)) as probe:
            # As the server binds: a port in TIME_WAIT after a restart is free to take.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as error:
        if error.errno == errno.EAFNOSUPPORT:  # no IPv6 here: the server skips it too
            return _REASONS[errno.EADDRNOTAVAIL]
        return _REASONS.get(error.errno or 0, error.strerror or type(error).__name__)
    return None
