"""The frontier for people and for files: a table (rich), a JSON document and the plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from io import StringIO
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from router.sim.frontier import FrontierPoint, FrontierResult, contiguous_ranges

FRONTIER_FILE = "frontier.json"
FRONTIER_PLOT = "frontier.png"
PLOTS_INSTALL = "pip install 'hetero-router[plots]'"
TABLE_WIDTH = 160

_UNMET_CELL = {"any-size": "unmet at any size", "budget": "unmet: run budget spent"}


def format_frontier(result: FrontierResult, width: int = TABLE_WIDTH) -> str:
    """The table (a row per TPOT target, a column per fleet type) and what it says."""
    table = Table(
        title=(
            f"{result.model}: cheapest fleet per TPOT SLO (TTFT {result.ttft_slo_s * 1e3:g} ms, "
            f"attainment {result.target_attainment:.0%}), $ per million output tokens"
        ),
        show_lines=True,
    )
    table.add_column("TPOT SLO", justify="right", no_wrap=True)
    for fleet in result.fleet_types:
        table.add_column(fleet.label, justify="left")
    table.add_column("cheapest", justify="left")
    for index, slo in enumerate(result.tpot_slos_s):
        cells = [_cell(result.points[fleet.name][index], result) for fleet in result.fleet_types]
        found = result.cheapest(index)
        table.add_row(f"{slo * 1e3:g} ms", *cells, "none" if found is None else found[0].label)
    out = StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False)
    console.print(table)
    for line in summary_lines(result):
        console.print(line, soft_wrap=True)
    return out.getvalue().rstrip("\n")


def summary_lines(result: FrontierResult) -> list[str]:
    """Where the split pays, where only SRAM decode serves, what the sweep cost."""
    order = [slo * 1e3 for slo in result.tpot_slos_s]
    hetero = next((fleet.label for fleet in result.fleet_types if fleet.heterogeneous), None)
    none = [
        slo * 1e3 for index, slo in enumerate(result.tpot_slos_s) if result.cheapest(index) is None
    ]
    lines = []
    if hetero is not None:
        lines.append(f"{hetero} is cheapest at: {_ranges(result.split_pays_ms(), order)}")
    lines.append(f"only SRAM decode meets it at: {_ranges(result.only_sram_decode_ms(), order)}")
    lines.append(f"no fleet meets it at: {_ranges(none, order)}")
    lines.append(
        f"{result.runs} simulations of {result.requests} requests "
        f"({result.window_s:g} s of arrivals, {result.output_tokens_per_hour / 1e6:,.2f} M "
        f"output tokens/h) in {result.cpu_s:,.0f} s CPU ({result.wall_s:,.0f} s wall)"
    )
    if result.skipped_profiles:
        lines.append(f"(cannot hold {result.model}: {', '.join(result.skipped_profiles)})")
    return lines


def frontier_document(result: FrontierResult, meta: Mapping[str, Any]) -> dict[str, Any]:
    return {**meta, **result.to_dict()}


def write_frontier(
    json_path: Path, plot_path: Path, result: FrontierResult, meta: Mapping[str, Any]
) -> list[str]:
    """Writes the JSON and draws the plot; returns notes (a plot skipped, and why)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    document = frontier_document(result, meta)
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    try:
        # Loaded only here: matplotlib is an optional extra, and nothing else needs it.
        from router.sim import frontier_plot  # noqa: PLC0415 (the import is what may fail)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.partition(".")[0] != "matplotlib":
            raise
        return [f"frontier plot skipped: matplotlib is not installed ({PLOTS_INSTALL})"]
    frontier_plot.draw(plot_path, result)
    return []


def _cell(point: FrontierPoint, result: FrontierResult) -> str:
    if point.best is None:
        if point.unmet == "max-devices":
            return f"unmet within {result.max_devices} devices"
        return _UNMET_CELL.get(point.unmet or "", "unmet")
    cost = point.usd_per_million_output_tokens
    money = "-" if cost is None or not math.isfinite(cost) else f"${cost:,.2f}"
    candidate = point.best.candidate
    return f"{money}\n{candidate.label()}, ${candidate.price_per_hour_usd:,.0f}/h"


def _ranges(values: Sequence[float], order: Sequence[float]) -> str:
    if not values:
        return "none of the targets"
    spans = contiguous_ranges(values, order)
    return ", ".join(f"{a:g} ms" if a == b else f"{a:g}-{b:g} ms" for a, b in spans)
