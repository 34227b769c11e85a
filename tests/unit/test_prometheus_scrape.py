"""Reading an engine's /metrics page: the samples a load probe needs, whatever else is there."""

from __future__ import annotations

import math

from backends.http_common import Sample, parse_prometheus

SCRAPE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m \\"quoted\\", {odd}\\nline \\\\ end"} 3
vllm:num_requests_running{engine="1"} 2.5 1700000000000
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",} 1.5e3
vllm:request_prompt_tokens_bucket{engine="0",le="+Inf"} +Inf
vllm:kv_cache_usage_perc NaN
"""


def test_samples_are_filed_by_the_name_on_their_line() -> None:
    samples = parse_prometheus(SCRAPE)
    assert samples["vllm:num_requests_running"] == [
        Sample(
            "vllm:num_requests_running",
            {"engine": "0", "model_name": 'm "quoted", {odd}\nline \\ end'},
            3.0,
        ),
        Sample("vllm:num_requests_running", {"engine": "1"}, 2.5),
    ]
    assert samples["vllm:prompt_tokens_total"] == [
        Sample("vllm:prompt_tokens_total", {"engine": "0"}, 1500.0)
    ]
    assert samples["vllm:request_prompt_tokens_bucket"][0].value == math.inf
    assert math.isnan(samples["vllm:kv_cache_usage_perc"][0].value)
    assert all(isinstance(s.value, float) for group in samples.values() for s in group)


def test_only_the_named_metrics_are_read() -> None:
    samples = parse_prometheus(SCRAPE, {"vllm:kv_cache_usage_perc", "absent"})
    assert list(samples) == ["vllm:kv_cache_usage_perc"]


def test_a_malformed_line_is_skipped_and_the_rest_is_read() -> None:
    text = 'up{job="a} 1\nup{job="b"}\nup not-a-number\n{orphan="x"} 1\nup{job="c"} 1\n'
    assert parse_prometheus(text) == {"up": [Sample("up", {"job": "c"}, 1.0)]}
