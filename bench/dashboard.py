"""A Grafana dashboard's time-series panels drawn from a live Prometheus, as PNG.

Each panel's queries are asked of Prometheus' ``query_range`` as Grafana would ask
them with every template variable at "All" (their ``allValue``, ``.*``) and
``$__rate_interval`` at the given window; legends are filled from the series'
labels; the panel's unit picks the axis (seconds are shown in milliseconds on a log
scale, bytes per second in MB/s). Rows become nothing but order.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import plots
from bench.prometheus import Prometheus

_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# Grafana unit -> (axis label, scale, log axis)
_UNITS = {
    "s": ("ms", 1000.0, True),
    "reqps": ("req/s", 1.0, False),
    "percentunit": ("ratio", 1.0, False),
    "Bps": ("MB/s", 1e-6, False),
}


@dataclass(frozen=True)
class Query:
    expression: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    unit: str
    queries: tuple[Query, ...]


def panels(path: Path, rate_interval: str) -> list[PanelSpec]:
    """The time-series panels of a dashboard file, their queries made concrete."""
    board = json.loads(path.read_text())
    found = []
    for panel in _flattened(board["panels"]):
        if panel.get("type") != "timeseries":
            continue
        queries = tuple(
            Query(_concrete(t["expr"], rate_interval), t.get("legendFormat", ""))
            for t in panel.get("targets", [])
            if t.get("expr")
        )
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        found.append(PanelSpec(panel.get("title", ""), unit, queries))
    return found


def _flattened(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels in order, those of collapsed rows included."""
    flat = []
    for item in items:
        flat.append(item)
        flat.extend(item.get("panels", []))
    return flat


def _concrete(expression: str, rate_interval: str) -> str:
    """``$__rate_interval`` at the window; every other variable at All (``.*``)."""
    return _VARIABLE.sub(
        lambda match: rate_interval if match.group(1) == "__rate_interval" else ".*", expression
    )


def _legend(template: str, labels: dict[str, str]) -> str:
    text = _LEGEND.sub(lambda match: labels.get(match.group(1), ""), template)
    return text.strip() or ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


async def drawn(
    server: Prometheus, specs: Sequence[PanelSpec], start: float, end: float, origin: float
) -> tuple[list[plots.Panel], list[str]]:
    """Each panel's lines from ``start`` to ``end`` (unix times, shown in seconds from
    ``origin``), and the titles of panels none of whose queries gave a point."""
    step = max(1.0, round((end - start) / 300))
    drawn_panels, empty = [], []
    for spec in specs:
        axis, scale, log = _UNITS.get(spec.unit, ("", 1.0, False))
        lines: dict[str, list[tuple[float, float]]] = {}
        for query in spec.queries:
            for series in await server.query_range(query.expression, start, end, step):
                points = [(t - origin, v * scale) for t, v in series.points if math.isfinite(v)]
                lines[_legend(query.legend, series.labels)] = points
        if not any(lines.values()):
            empty.append(spec.title)
        drawn_panels.append(plots.Panel(spec.title, axis, lines, log=log))
    return drawn_panels, empty
