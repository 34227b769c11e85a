"""structlog set-up: JSON lines (or console), the request id bound in contextvars."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


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
