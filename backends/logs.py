"""The one log configuration of every process, router and mock device alike.

structlog renders each event as one JSON line (or a console line) on stderr. The
standard library's ``logging`` (aiohttp, grpc's Python side, asyncio), ``warnings``
and an uncaught exception go through the same renderer, so a process writes nothing
but JSON lines; each of those names its ``logger``. ``fields`` are added to every line
of the process: a device's ``device`` (its backend id) tells its lines from the
router's in the stream they share.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "console")
_LEVEL_NUMBERS = {name: getattr(logging, name.upper()) for name in LEVELS}


class _Fields:
    """Adds the process's own fields to every event that does not carry them already."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        self._fields = dict(fields)

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        for key, value in self._fields.items():
            event.setdefault(key, value)
        return event


class _Timestamp:
    """``timestamp``: ISO 8601 in UTC with microseconds (``2026-12-02T07:20:32.672219Z``),
    as structlog's TimeStamper(fmt="iso", utc=True) writes it, at a fraction of its cost:
    the date and the time of day are formatted once a second, not once a line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


def _dumps(event: EventDict, **options: Any) -> str:
    """One JSON line, by orjson (a tenth of the standard library's time: the router writes
    a line per request); what orjson refuses (an int past 64 bits) by the standard one."""
    try:
        return orjson.dumps(event, default=options.get("default")).decode()
    except TypeError:
        return json.dumps(event, **options)


class _Handler(logging.Handler):
    """Writes formatted records as structlog's own lines are written: one ``write`` of
    the whole line, under structlog's lock for the stream, so lines never interleave."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._writer = structlog.WriteLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.msg(self.format(record))
        except Exception:  # noqa: BLE001  # logging's own contract: a handler never raises
            self.handleError(record)


def configure(
    level: str = "info",
    fmt: str = "json",
    *,
    fields: Mapping[str, object] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configures structlog and the standard library's logging for this process.

    ``level`` is one of LEVELS (an unknown one logs errors only), ``fmt`` one of
    FORMATS; ``stream`` defaults to stderr. Calling it again replaces the previous
    configuration."""
    out = sys.stderr if stream is None else stream
    threshold = _LEVEL_NUMBERS.get(level, logging.ERROR)
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _Timestamp(),
        _Fields(fields or {}),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    logging.captureWarnings(True)  # warnings.warn: a line of the "py.warnings" logger
    sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    """An exception nothing caught: one line with its traceback, not Python's plain text."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)
    log.critical("uncaught exception", exc_info=(kind, error, traceback))
