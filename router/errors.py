"""The router's own errors, in the one tree of :mod:`backends.errors`.

Everything below the edges raises a :class:`~backends.errors.ServingError`; the
gRPC and HTTP servers translate it to a status once, and nothing else ever
reaches a client.
"""

from __future__ import annotations

from backends import errors as _base
from backends.errors import ServingError

# Echoed input is cut as every file reader cuts it (the rule lives with the tree's base).
ECHO_LIMIT = _base.ECHO_LIMIT
shown = _base.shown


class InvalidRequestError(ServingError):
    """Bad input; nothing was sent to a backend. ``param`` names the field at fault, if
    one; ``code`` is OpenAI's machine-readable error code, if one applies."""

    grpc_status = "INVALID_ARGUMENT"
    http_status = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFoundError(InvalidRequestError):
    """The request names a model no backend serves: 404 ``model_not_found`` on HTTP, as
    OpenAI answers; INVALID_ARGUMENT on gRPC."""

    http_status = 404

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_not_found")


class NoHealthyBackendError(ServingError):
    """No backend can take the request right now."""

    grpc_status = "UNAVAILABLE"
    http_status = 503


# The retry hint of a retryable error that carries none: one health check interval
# (the default ``health_interval_s``), the earliest a lost backend can be back.
DEFAULT_RETRY_AFTER_S = 1.0
_RETRYABLE = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})


def retry_hint_s(error: ServingError) -> float | None:
    """When the client may try again, in seconds: the error's own hint, else
    DEFAULT_RETRY_AFTER_S; None for an error a retry cannot fix (bad input, a KV layout
    mismatch, an internal error)."""
    if error.grpc_status not in _RETRYABLE:
        return None
    return DEFAULT_RETRY_AFTER_S if error.retry_after_s is None else error.retry_after_s


class ConfigError(Exception):
    """A settings or pool file problem, reported at start-up with the file and field."""
