"""bench.path_cost splits CPU per request into a part per request and a part per token."""

from __future__ import annotations

import pytest

from bench.path_cost import Run, split_costs


def test_the_costs_are_the_line_through_both_lengths() -> None:
    runs = [
        Run("colocated", 1, 100, 1_100.0, 2.0),
        Run("colocated", 65, 100, 8_780.0, 2.1),
        Run("split", 1, 100, 5_000.0, 3.0),
        Run("split", 65, 100, 5_640.0, 3.0),
    ]
    assert split_costs(runs, "colocated") == pytest.approx((980.0, 120.0))
    assert split_costs(runs, "split") == pytest.approx((4_990.0, 10.0))
