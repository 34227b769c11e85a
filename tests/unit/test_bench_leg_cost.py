"""bench.leg_cost: the figures it prints from its rounds."""

from __future__ import annotations

import pytest

from bench.leg_cost import ADAPTER, BARE, figures


def test_each_system_is_its_median_round_over_the_bare_legs() -> None:
    found = figures(
        {
            BARE: [(400.0, 800.0), (380.0, 900.0), (900.0, 700.0)],
            ADAPTER: [(600.0, 1000.0), (500.0, 1200.0), (520.0, 1100.0)],
            "none": [],
        }
    )
    assert [f.name for f in found] == [BARE, ADAPTER]
    bare, adapter = found
    assert (bare.cpu_us_per_request, bare.wall_us_per_request) == pytest.approx((400.0, 800.0))
    assert bare.ratio == pytest.approx(1.0)
    assert (adapter.cpu_us_per_request, adapter.wall_us_per_request) == pytest.approx(
        (520.0, 1100.0)
    )
    assert adapter.ratio == pytest.approx(1.3)


def test_without_the_bare_legs_there_is_no_ratio() -> None:
    (only,) = figures({ADAPTER: [(500.0, 900.0)]})
    assert only.ratio is None
