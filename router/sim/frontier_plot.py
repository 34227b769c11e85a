"""The frontier drawn (PNG): cost per million output tokens against the TPOT SLO.

Needs matplotlib, the ``plots`` extra; only ``router.sim.frontier_report`` loads this
module, when it writes a frontier.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from router.sim.frontier import FrontierResult, contiguous_ranges

_STYLES = (  # colour, marker, line style: lines that coincide stay apart
    ("tab:blue", "o", "-"),
    ("tab:orange", "s", "--"),
    ("tab:green", "D", "-"),
    ("tab:purple", "^", ":"),
    ("tab:brown", "v", "-."),
)
_UNMET_MARKERS = {"any-size": "x", "max-devices": "o", "budget": "$?$"}
_UNMET_LABELS = {
    "any-size": "cannot meet at any size",
    "max-devices": "not within the device bound",
    "budget": "run budget spent",
}


def draw(path: Path, result: FrontierResult) -> None:
    figure, (strip, axis) = plt.subplots(
        2,
        1,
        figsize=(11, 7.5),
        sharex=True,
        gridspec_kw={"height_ratios": [1, 4], "hspace": 0.08},
    )
    slos_ms = [slo * 1e3 for slo in result.tpot_slos_s]
    _shade(axis, strip, result, slos_ms)
    for order, fleet in enumerate(result.fleet_types):
        colour, marker, style = _STYLES[order % len(_STYLES)]
        points = result.points[fleet.name]
        xs = [ms for ms, p in zip(slos_ms, points, strict=True) if p.met]
        ys = [p.usd_per_million_output_tokens for p in points if p.met]
        if xs:
            axis.plot(xs, ys, style, marker=marker, color=colour, label=fleet.label, lw=2, ms=7)
        for ms, point in zip(slos_ms, points, strict=True):
            if point.unmet is not None:
                strip.scatter([ms], [order], marker=_UNMET_MARKERS[point.unmet], color=colour, s=60)
    _axes(axis, strip, result, slos_ms)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _shade(axis: Axes, strip: Axes, result: FrontierResult, slos_ms: list[float]) -> None:
    """Where the heterogeneous split is the cheapest fleet, and where it starts and stops."""
    hetero = next((fleet for fleet in result.fleet_types if fleet.heterogeneous), None)
    if hetero is None:
        return
    for first, last in contiguous_ranges(result.split_pays_ms(), slos_ms):
        low, high = _edge(slos_ms, first, -1), _edge(slos_ms, last, +1)
        for each in (axis, strip):
            each.axvspan(low, high, color="tab:green", alpha=0.1, lw=0)
        for edge, words in ((low, "split starts paying"), (high, "split stops paying")):
            if edge in (_edge(slos_ms, slos_ms[0], -1), _edge(slos_ms, slos_ms[-1], +1)):
                continue  # the sweep's own end, not a change
            axis.axvline(edge, color="tab:green", ls="--", lw=1)
            axis.annotate(
                words,
                (edge, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(4, -14),
                textcoords="offset points",
                color="tab:green",
                fontsize=9,
            )


def _edge(slos_ms: list[float], value: float, side: int) -> float:
    """The geometric midpoint between ``value`` and its neighbour on ``side``."""
    index = slos_ms.index(value)
    neighbour = index + side
    if 0 <= neighbour < len(slos_ms):
        return math.sqrt(value * slos_ms[neighbour])
    ratio = slos_ms[1] / slos_ms[0] if len(slos_ms) > 1 else 1.5
    return value * math.sqrt(ratio) ** side


def _axes(axis: Axes, strip: Axes, result: FrontierResult, slos_ms: list[float]) -> None:
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.xaxis.set_major_locator(FixedLocator(slos_ms))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"${value:g}"))
    axis.yaxis.set_minor_locator(NullLocator())
    axis.set_xlim(_edge(slos_ms, slos_ms[0], -1), _edge(slos_ms, slos_ms[-1], +1))
    axis.set_xlabel("TPOT SLO (ms, log scale)")
    axis.set_ylabel("$ per million output tokens (log scale)")
    costs = [
        p.usd_per_million_output_tokens
        for ps in result.points.values()
        for p in ps
        if p.usd_per_million_output_tokens is not None
    ]
    if costs:  # room for a labelled tick below and above every line
        axis.set_ylim(min(costs) / 1.4, max(costs) * 1.4)
    axis.grid(alpha=0.3, which="major")
    axis.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(result.fleet_types), fontsize=9
    )
    strip.set_ylim(-0.6, len(result.fleet_types) - 0.4)
    strip.set_yticks(range(len(result.fleet_types)))
    strip.set_yticklabels([fleet.label for fleet in result.fleet_types], fontsize=8)
    strip.invert_yaxis()
    strip.tick_params(axis="x", which="both", bottom=False)
    strip.grid(alpha=0.3, axis="x")
    kinds = sorted({p.unmet for ps in result.points.values() for p in ps if p.unmet})
    legend = ", ".join(f"{_UNMET_MARKERS[k].strip('$')} {_UNMET_LABELS[k]}" for k in kinds)
    strip.set_title(f"SLOs a fleet type cannot meet ({legend})", fontsize=9, loc="left")
    strip.set_ylim(len(result.fleet_types) - 0.4, -0.6)
    axis.figure.suptitle(
        f"{result.model}: cheapest fleet per TPOT SLO (TTFT {result.ttft_slo_s * 1e3:g} ms, "
        f"{result.target_attainment:.0%} attainment, "
        f"{result.output_tokens_per_hour / 1e6:,.1f} M output tokens/h)",
        fontsize=11,
    )
