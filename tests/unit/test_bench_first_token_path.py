"""bench.first_token_path: the segments it cuts a request's first-token path into, and
that its probes sit on the path a split request through the HTTP door takes."""

from __future__ import annotations

import aiohttp
import pytest

from bench.first_token_path import (
    MOMENTS,
    SEGMENTS,
    Figures,
    _Recorder,
    instrument,
    medians,
    p99s,
    report,
    segments,
)
from router.api import openai_http
from tests.helpers import vllm_split_router


def test_each_segment_is_the_time_between_two_moments() -> None:
    marks = [(name, 1000 * step * step) for step, name in enumerate(MOMENTS)]
    cut = segments([*marks, ("first event out", 10**12)])  # a later repeat is ignored
    assert cut is not None
    assert len(cut) == len(SEGMENTS) == len(MOMENTS) - 1
    assert cut == [float(2 * step + 1) for step in range(len(SEGMENTS))]  # (n+1)^2 - n^2


def test_a_request_without_every_moment_in_order_has_no_segments() -> None:
    marks = [(name, step) for step, name in enumerate(MOMENTS)]
    assert segments(marks[:-1]) is None
    swapped = [*marks[:3], marks[4], marks[3], *marks[5:]]
    assert segments([(name, step) for step, (name, _) in enumerate(swapped)]) is None


def test_the_figures_are_each_segments_median_and_the_routers_share() -> None:
    found = medians([[1.0, 10.0], [3.0, 30.0], [2.0, 20.0]])
    assert found == [2.0, 20.0]
    hundred = [[float(n), float(-n)] for n in range(100)]
    assert p99s(hundred) == pytest.approx([98.01, -0.99])  # interpolated, as numpy's
    assert p99s([[float(n), 0.0] for n in range(201)]) == pytest.approx([198.0, 0.0])
    count = len(SEGMENTS)
    figures = Figures([10.0] * count, [30.0] * count, 5, 1.5, 0.5, 4.0, 1.0)
    assert figures.router_us == pytest.approx(10.0 * sum(s.router for s in SEGMENTS))
    lines = list(report(figures))
    assert any("added: p50 1.000 ms, p99 3.000 ms (5 requests)" in line for line in lines)


async def test_the_probes_mark_every_moment_of_a_split_through_the_http_door() -> None:
    recorder = _Recorder()
    restore = instrument(recorder)
    try:
        async with (
            vllm_split_router("llama-3.1-8b", "tiny") as (daemon, _prefill, _decode),
            aiohttp.ClientSession() as session,
        ):
            url = f"http://127.0.0.1:{daemon.http_port}/v1/completions"
            body = {"prompt": "one two three", "max_tokens": 4, "stream": True}
            for _ in range(2):
                async with session.post(url, json={**body, "disaggregation": "split"}) as reply:
                    assert reply.status == 200
                    await reply.read()
            recorder.close()
    finally:
        restore()
    assert len(recorder.requests) == 2
    assert all(us >= 0 for request in recorder.requests for us in request)
    assert openai_http.OpenAIRoutes._parse.__name__ == "_parse"  # restored
    assert not hasattr(openai_http.OpenAIRoutes._parse, "__wrapped__")  # as above
