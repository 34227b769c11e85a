"""bench.door_cost: the A/B settings it is given and the figures it prints."""

from __future__ import annotations

import pytest

from bench.door_cost import figures, parse_env
from bench.scenarios.peers import Window


def _window(
    ok: int, cpu_s: float | None, elapsed_s: float = 2.0, failed: int = 0, kernel_s: float = 0.0
) -> Window:
    return Window(ok, failed, elapsed_s, cpu_s, 0.0, 0.0, None, kernel_s)


def test_settings_are_key_value_pairs_and_a_bad_one_is_named() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("A", "=1", " A=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_env([bad])


def test_each_system_is_its_median_window_over_vllm_routers() -> None:
    found = figures(
        {
            "vllm-router": [
                _window(1000, 0.4, kernel_s=0.2),
                _window(1000, 0.5, kernel_s=0.3),
                _window(1000, 0.9, kernel_s=0.4),
            ],
            "hetero-http": [_window(500, 0.5), _window(400, 0.44, failed=2), _window(500, 0.6)],
            "gone": [_window(0, 0.1), _window(10, None)],
        }
    )
    assert [(f.name, f.failed) for f in found] == [("vllm-router", 0), ("hetero-http", 2)]
    theirs, ours = found
    assert (theirs.cpu_us_per_request, theirs.requests_per_s) == pytest.approx((500.0, 500.0))
    assert theirs.ratio == pytest.approx(1.0)
    assert (ours.cpu_us_per_request, ours.requests_per_s) == pytest.approx((1100.0, 250.0))
    assert ours.ratio == pytest.approx(2.2)
    assert theirs.kernel_share == pytest.approx(0.5)  # over all its windows' CPU


def test_without_vllm_router_there_is_no_ratio() -> None:
    (only,) = figures({"hetero-http": [_window(100, 0.1)]})
    assert only.ratio is None
    assert only.cpu_us_per_request == pytest.approx(1000.0)
