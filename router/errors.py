"""One exception tree for the package.

Everything below raises these; the edges (gRPC and HTTP servers) translate them
to a status once, and nothing else ever reaches a client.
"""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """Base of every error the router reports to a client."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequestError(RouterError):
    """Bad input; nothing was sent to a backend."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class OverloadedError(RouterError):
    """Shed by admission control; retry later."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class NoHealthyBackendError(RouterError):
    """No backend can take the request right now."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class BackendError(RouterError):
    """A backend failed while serving the request."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502

    def __init__(self, backend_id: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"backend {backend_id}: {message}")
        self.backend_id = backend_id
        self.retryable = retryable


class LayoutMismatchError(RouterError):
    """Prefill and decode devices do not share a KV layout; no byte was moved."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class DeadlineExceededError(RouterError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class ConfigError(Exception):
    """A settings or pool file problem, reported at start-up with the file and field."""
