"""The errors adapters raise, and the base of every error reported to a client.

The router's own errors (bad input, no backend) derive from :class:`ServingError`
too, so the edges (gRPC and HTTP servers) translate one tree, once: each class
names its gRPC status (a ``grpc.StatusCode`` name, so that policies and the
simulator raise them without importing grpc) and its HTTP status, and nothing
else ever reaches a client.
"""

from __future__ import annotations

# Echoed input is cut to this many characters: an error message must stay small
# whatever the client (or a file) said (a 20 KB model name would not fit gRPC's status
# header).
ECHO_LIMIT = 64


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``value`` as an error message quotes it: its repr, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


class ServingError(Exception):
    """Base of every error reported to a client."""

    grpc_status: str = "INTERNAL"  # a grpc.StatusCode name
    http_status: int = 500

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class OverloadedError(ServingError):
    """Shed (by the router's admission control or a full backend); retry later."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429


class BackendError(ServingError):
    """A backend failed while serving the request."""

    grpc_status = "UNAVAILABLE"
    http_status = 502

    def __init__(self, backend_id: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"backend {backend_id}: {message}")
        self.backend_id = backend_id
        self.retryable = retryable


class BackendRejectedError(BackendError):
    """The engine refused the request as invalid (a prompt over its context length, a
    parameter it does not take): the client's fault, not the backend's.

    Any backend would refuse it alike, so it is never retried, neither by the router
    (no colocated fallback) nor by clients (INVALID_ARGUMENT, not UNAVAILABLE); the
    message keeps the engine's own words.
    """

    grpc_status = "INVALID_ARGUMENT"
    http_status = 400

    def __init__(self, backend_id: str, message: str) -> None:
        super().__init__(backend_id, message, retryable=False)


class LayoutMismatchError(ServingError):
    """Prefill and decode devices do not share a KV layout; no byte was moved."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 409
