"""The router's own errors, in the one tree of :mod:`backends.errors`.

Everything below the edges raises a :class:`~backends.errors.ServingError`; the
gRPC and HTTP servers translate it to a status once, and nothing else ever
reaches a client.
"""

from __future__ import annotations

from backends.errors import ServingError


class InvalidRequestError(ServingError):
    """Bad input; nothing was sent to a backend. ``param`` names the field at fault, if one."""

    grpc_status = "INVALID_ARGUMENT"
    http_status = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NoHealthyBackendError(ServingError):
    """No backend can take the request right now."""

    grpc_status = "UNAVAILABLE"
    http_status = 503


class ConfigError(Exception):
    """A settings or pool file problem, reported at start-up with the file and field."""
