"""structlog set-up: JSON lines (or console), the request id bound in contextvars.

The configuration itself is :mod:`backends.logs`, which the mock devices use too."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from backends import logs


def configure(
    level: str = "info", fmt: str = "json", fields: Mapping[str, object] | None = None
) -> None:
    """The router's logs: structlog and the standard library's logging, on stderr;
    ``fields`` on every line (a worker's ``worker``)."""
    logs.configure(level, fmt, fields=fields)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger


def bind_request(request_id: str, backend_request_id: str) -> None:
    """Every log line of the request names it: ``request_id`` as its client knows it,
    ``backend_request_id`` as its backends do (the router's own, unique id)."""
    structlog.contextvars.bind_contextvars(
        request_id=request_id, backend_request_id=backend_request_id
    )


def unbind_request() -> None:
    structlog.contextvars.unbind_contextvars("request_id", "backend_request_id")
