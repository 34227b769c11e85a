"""W3C Trace Context (https://www.w3.org/TR/trace-context/) as a client sends it.

Both doors read ``traceparent`` and ``tracestate`` (gRPC metadata, HTTP headers) and
hand the backends what they read, so that an engine's own trace joins the client's.
A header that is not valid is ignored, as the recommendation says (the trace then
restarts at the router); it never fails the request. Version 00 is read as it is
specified: ``00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>``, lower-case,
neither id all zeros. A later version is read for the same fields, as the
recommendation asks, and passed on as version 00 (what the router knows).

``tracestate`` only travels with a valid ``traceparent``. It is kept as the client
sent it when it holds printable ASCII only, its several headers joined with commas;
list members past 32, or past 512 characters in all, are dropped from the end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})"
)
_VERSION_00_LENGTH = 55
# Longer values are not looked at: a header is bounded before any parsing.
_MAX_TRACEPARENT_CHARS = 512
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_CHARS = 512
_ZERO_TRACE_ID = "0" * 32
_ZERO_PARENT_ID = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    traceparent: str = ""
    tracestate: str = ""


NO_TRACE = TraceContext()


def trace_context(traceparents: Sequence[str], tracestates: Sequence[str]) -> TraceContext:
    """What to pass on of the headers a call carried (each name's values, in order)."""
    if len(traceparents) != 1:  # none, or several: which one is meant cannot be told
        return NO_TRACE
    traceparent = parse_traceparent(traceparents[0])
    if not traceparent:
        return NO_TRACE
    return TraceContext(traceparent, _tracestate(tracestates))


def parse_traceparent(value: str) -> str:
    """``value`` as it is to be passed on; empty when it is no valid traceparent."""
    if len(value) > _MAX_TRACEPARENT_CHARS:
        return ""
    match = _TRACEPARENT.match(value)
    if match is None:
        return ""
    version = match["version"]
    if version == "ff" or match["trace_id"] == _ZERO_TRACE_ID:
        return ""
    if match["parent_id"] == _ZERO_PARENT_ID:
        return ""
    if version == "00":
        return value if len(value) == _VERSION_00_LENGTH else ""
    # A later version may append fields, after a dash.
    if len(value) > _VERSION_00_LENGTH and value[_VERSION_00_LENGTH] != "-":
        return ""
    return f"00-{match['trace_id']}-{match['parent_id']}-{match['flags']}"


def _tracestate(values: Sequence[str]) -> str:
    joined = ",".join(values)
    if len(joined) > 4 * MAX_TRACESTATE_CHARS or not _printable_ascii(joined):
        return ""
    members = [member.strip() for member in joined.split(",")]
    kept: list[str] = []
    length = -1  # the first member has no comma before it
    for member in members:
        if not member:
            continue  # empty members are allowed, and carry nothing
        if len(kept) == MAX_TRACESTATE_MEMBERS or length + 1 + len(member) > MAX_TRACESTATE_CHARS:
            break
        kept.append(member)
        length += 1 + len(member)
    return ",".join(kept)


def _printable_ascii(text: str) -> bool:
    return all(" " <= char <= "~" for char in text)
