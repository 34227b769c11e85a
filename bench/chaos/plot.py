"""The chaos run's figure: throughput and failures over time, faults marked, devices' lanes.

Drawn from the result's JSON (``faults.records``, ``timeline.router_unhealthy``) and
its timeline, so a committed result can be drawn again without running anything:
``python -m bench.chaos.plot bench/results``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bench.chaos.timeline import Timeline
from router.sim.axes import legend_beside, legible, save

KIND_COLORS = {"kill": "tab:red", "stop": "tab:orange", "restart": "tab:purple"}
_FAULT_FREE = {"color": "tab:grey", "linewidth": 3.5, "alpha": 0.45}
ENDING_COLORS = {
    "complete": "tab:green",
    "error_before_first_token": "tab:red",
    "error_after_first_token": "tab:orange",
    "lost": "black",
}


def draw(path: Path, result: Mapping[str, Any], timeline: Timeline) -> None:
    save(figure_of(result, timeline), path)


def figure_of(result: Mapping[str, Any], timeline: Timeline) -> Figure:
    records = [r for r in result["faults"]["records"] if r["applied_s"] is not None]
    width, series = timeline.bin_s, timeline.series
    figure, axes = plt.subplots(
        4,
        1,
        figsize=(13, 12),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 3, 3, 2]},
        layout="constrained",
    )
    tokens, requests, ttft, lanes = axes

    # The fault-free run is a wide pale band under the chaos run's line: where the two
    # agree (most of the time) both still show.
    _steps(tokens, series["tokens_fault_free"], width, "fault-free run", _FAULT_FREE)
    _steps(tokens, series["tokens_chaos"], width, "chaos run", {"color": "tab:blue"})
    tokens.set_ylabel("tokens/s delivered")

    _steps(requests, series["completed_fault_free"], width, "completed, fault-free", _FAULT_FREE)
    _steps(requests, series["completed_chaos"], width, "completed, chaos", {"color": "tab:green"})
    starts = np.arange(len(series["errors_chaos"])) * width
    requests.bar(
        starts,
        series["errors_chaos"],
        width,
        align="edge",
        color="tab:red",
        alpha=0.7,
        label="errors, chaos",
    )
    requests.bar(
        starts,
        series["lost_chaos"],
        width,
        align="edge",
        color="black",
        bottom=series["errors_chaos"],
        label="lost, chaos",
    )
    requests.set_ylabel("requests/s (by end time)")

    for ending, color in ENDING_COLORS.items():
        points = [p for p in timeline.requests if p.ending == ending]
        with_token = [(p.start_s, p.ttft_s * 1000) for p in points if p.ttft_s is not None]
        without = [(p.start_s, p.elapsed_s * 1000) for p in points if p.ttft_s is None]
        label = ending.replace("_", " ")
        if with_token:
            ttft.scatter(*zip(*with_token, strict=True), s=6, color=color, label=label)
        if without:  # no token at all: marked where the request ended
            ttft.scatter(
                *zip(*without, strict=True),
                s=18,
                color=color,
                marker="x",
                label=f"{label} (time to the end)",
            )
    ttft.set_yscale("log")
    ttft.set_ylabel("TTFT ms (by send time)")

    _lanes(lanes, result, records, timeline.span_s)
    for axis in (tokens, requests, ttft):
        for record in records:
            axis.axvline(record["applied_s"], color=KIND_COLORS[record["kind"]], lw=0.8, alpha=0.6)
        axis.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, label=f"{k} (fault)") for k, c in KIND_COLORS.items()]
    tokens.legend(
        handles=[*tokens.get_legend_handles_labels()[0], *handles],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
    )
    legend_beside(requests, fontsize=8)
    legend_beside(ttft, fontsize=8)
    lanes.set_xlabel("seconds since the load started")
    figures = result["figures"]
    figure.suptitle(
        f"Chaos ({result['mode']}): {figures['faults_injected']} faults, "
        f"{figures['requests']} requests; lost {figures['requests_lost']}, tokens differ "
        f"{figures['tokens_differ']}, errors before/after first token "
        f"{figures['errors_before_first_token']}/{figures['errors_after_first_token']}, "
        f"goodput drop {figures['goodput_drop']:.1%}",
        fontsize=10,
    )
    return legible(figure)


def _steps(
    axis: Axes, values: Sequence[float], width: float, label: str, style: Mapping[str, Any]
) -> None:
    if values:
        edges = np.arange(len(values) + 1) * width
        axis.stairs(values, edges, label=label, **style)


def _lanes(
    axis: Axes,
    result: Mapping[str, Any],
    records: list[Mapping[str, Any]],
    end: float,
) -> None:
    """One lane per device: when the bench held it down, and below when the router
    counted it unhealthy."""
    devices = [entry["id"] for entry in result["cluster"]]
    for lane, device in enumerate(devices):
        for record in (r for r in records if r["device"] == device):
            back = record["back_s"] if record["back_s"] is not None else end
            span = max(back - record["applied_s"], 0.2)
            axis.broken_barh(
                [(record["applied_s"], span)], (lane + 0.1, 0.5), color=KIND_COLORS[record["kind"]]
            )
        unhealthy = [
            (s, max(e - s, 0.1)) for s, e in result["timeline"]["router_unhealthy"].get(device, [])
        ]
        axis.broken_barh(unhealthy, (lane - 0.3, 0.25), color="black")
    roles = {entry["id"]: entry["role"] for entry in result["cluster"]}
    axis.set_yticks(range(len(devices)))
    axis.set_yticklabels([f"{d} ({roles[d]})" for d in devices], fontsize=8)
    axis.set_ylim(-0.5, len(devices))
    axis.set_title("devices: fault held (colour) / router saw unhealthy (black)", fontsize=9)


if __name__ == "__main__":
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    draw(
        results / "chaos.png",
        json.loads((results / "chaos.json").read_text()),
        Timeline.read(results),
    )
