"""What was measured and what it means: per-request timings, SLOs, run summaries.

The definitions live in router.sim.metrics, shared with the simulator so that a
simulated run and a live one are judged alike; the benchmark imports them from here.
"""

from __future__ import annotations

from router.sim.metrics import (
    OK,
    SLO,
    SLO_PRESETS,
    Distribution,
    RequestRecord,
    RunSummary,
    percentile,
    summarize,
)

__all__ = [
    "OK",
    "SLO",
    "SLO_PRESETS",
    "Distribution",
    "RequestRecord",
    "RunSummary",
    "percentile",
    "summarize",
]
