"""W3C Trace Context as the doors read it: valid headers pass on as sent, others are ignored."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.api.trace_context import (
    MAX_TRACESTATE_CHARS,
    MAX_TRACESTATE_MEMBERS,
    NO_TRACE,
    TraceContext,
    parse_traceparent,
    trace_context,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize(
    "value", [VALID, f"00-{TRACE_ID}-{PARENT_ID}-00", f"00-{TRACE_ID}-{PARENT_ID}-ff"]
)
def test_a_valid_version_00_passes_unchanged(value: str) -> None:
    assert parse_traceparent(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        VALID.upper(),  # hex digits are lower case
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is invalid
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE_ID}-{PARENT_ID}-1",
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
        f" {VALID}",
        f"cc-{TRACE_ID}-{PARENT_ID}-01x",  # a later version appends after a dash only
        f"00-{TRACE_ID}-{PARENT_ID}-0\udcff",  # a header byte that is not UTF-8
        VALID + "-" * 10_000,
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str) -> None:
    assert parse_traceparent(value) == ""
    assert trace_context([value], ["vendor=1"]) == NO_TRACE  # its tracestate goes too


def test_a_later_version_is_read_for_its_known_fields_and_passed_on_as_00() -> None:
    later = f"cc-{TRACE_ID}-{PARENT_ID}-01-what-comes-later"
    assert parse_traceparent(later) == VALID
    assert parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-01") == VALID


def test_none_or_several_traceparents_are_no_trace() -> None:
    assert trace_context([], ["vendor=1"]) == NO_TRACE
    assert trace_context([VALID, VALID], []) == NO_TRACE


def test_tracestate_travels_with_a_valid_traceparent_joined_from_its_headers() -> None:
    assert trace_context([VALID], []) == TraceContext(VALID, "")
    assert trace_context([VALID], ["a=1,b=2", "c=3"]) == TraceContext(VALID, "a=1,b=2,c=3")
    assert trace_context([VALID], ["a=1 , ,b=2"]).tracestate == "a=1,b=2"


def test_a_tracestate_that_is_not_printable_ascii_is_dropped() -> None:
    assert trace_context([VALID], ["a=1\n"]).tracestate == ""
    assert trace_context([VALID], ["a=é"]).tracestate == ""


def test_tracestate_is_cut_to_whole_members_within_the_limits() -> None:
    many = ",".join(f"v{index}=x" for index in range(40))
    kept = trace_context([VALID], [many]).tracestate.split(",")
    assert kept == [f"v{index}=x" for index in range(MAX_TRACESTATE_MEMBERS)]
    long = ",".join(f"v{index}={'x' * 100}" for index in range(10))
    cut = trace_context([VALID], [long]).tracestate
    assert len(cut) <= MAX_TRACESTATE_CHARS
    assert long.startswith(cut)
    assert cut.split(",") == long.split(",")[: len(cut.split(","))]
    assert trace_context([VALID], ["a=" + "x" * 5000]).tracestate == ""


@given(st.text(max_size=80))
def test_any_text_is_either_a_valid_traceparent_or_ignored(value: str) -> None:
    parsed = parse_traceparent(value)
    assert parsed in ("", value) or value[:2] not in ("00", "ff")
    if parsed:
        assert len(parsed) == 55
        assert parse_traceparent(parsed) == parsed
