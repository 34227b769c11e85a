"""Plots of a simulated run (PNG). Needs matplotlib, the ``plots`` extra.

Only ``router.sim.report`` loads this module, when it writes a run's results: the
daemon and the rest of the simulator never import matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from router.sim.axes import legend_below, legend_beside, legible, line_style, save
from router.sim.metrics import FloatArray
from router.sim.results import SimResult, SimSummary

LATENCY_PLOT = "latency.png"
TIMELINE_PLOT = "timeline.png"
DEVICES_PLOT = "devices.png"
# Bins of the timeline: enough to show bursts, few enough to read, and each with
# enough arrivals for its mean TTFT to mean something.
_MAX_TIMELINE_BINS = 120
_MIN_TIMELINE_BINS = 10
_ARRIVALS_PER_BIN = 20
# A CDF of fewer requests than this marks each of them.
_MARKED_BELOW = 30
# Devices named under their bars up to this many; the figure grows with them up to a width.
_MAX_NAMED_DEVICES = 40
_MAX_DEVICES_WIDTH_IN = 20.0


def write_all(out: Path, result: SimResult, summary: SimSummary) -> None:
    save(latency(result, summary), out / LATENCY_PLOT)
    save(timeline(result), out / TIMELINE_PLOT)
    save(devices(summary), out / DEVICES_PLOT)


def latency(result: SimResult, summary: SimSummary) -> Figure:
    """CDFs of TTFT and TPOT over completed requests, split and colocated apart.

    "all" is a wide pale band under the two modes: where every request took one mode,
    the two lines coincide and both still show."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    ok = result.ok
    modes = (
        ("all", ok, {"color": "tab:grey", "linewidth": 5.0, "alpha": 0.4, "zorder": 1}),
        ("split", ok & result.split, {"color": "tab:blue", "linestyle": line_style(0)}),
        ("colocated", ok & ~result.split, {"color": "tab:orange", "linestyle": line_style(1)}),
    )
    for axis, values, title in (
        (axes[0], result.ttft_s, "TTFT (ms)"),
        (axes[1], result.tpot_s, "TPOT (ms)"),
    ):
        for label, mask, style in modes:
            count = int(mask.sum())
            noun = "request" if count == 1 else "requests"
            _cdf(axis, values[mask] * 1e3, f"{label} ({count:,} {noun})", style)
        axis.set_title(title)
        axis.set_xscale("log")
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
    figure.suptitle(f"{summary.cluster}: {summary.requests:,} requests")
    legend_below(figure, axes)
    return legible(figure)


def timeline(result: SimResult) -> Figure:
    """Arrivals and mean TTFT over time: where the queues built up."""
    figure, axis = plt.subplots(figsize=(11, 4.8), layout="constrained")
    end = max(float(result.arrival_s.max(initial=0.0)), 1e-9)
    bins = min(_MAX_TIMELINE_BINS, max(_MIN_TIMELINE_BINS, result.requests // _ARRIVALS_PER_BIN))
    edges = np.linspace(0.0, end, bins + 1)
    counts, _ = np.histogram(result.arrival_s, edges)
    width = edges[1] - edges[0]
    centers = (edges[:-1] + edges[1:]) / 2
    axis.plot(centers, counts / width, color="tab:grey", label="arrivals (req/s, left)")
    axis.set_xlabel("time since start (s)")
    axis.set_ylabel("requests per second")
    ttft_axis = axis.twinx()
    ok = result.ok
    sums, _ = np.histogram(result.arrival_s[ok], edges, weights=result.ttft_s[ok])
    served, _ = np.histogram(result.arrival_s[ok], edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_ttft = sums / served * 1e3
    ttft_axis.plot(
        centers,
        mean_ttft,
        color="tab:red",
        linestyle=line_style(1),
        label="mean TTFT of arrivals (ms, right)",
    )
    ttft_axis.set_ylabel("mean TTFT of arrivals (ms)")
    axis.grid(alpha=0.3)
    figure.suptitle("Arrivals and time to first token over the run")
    legend_below(figure, [axis, ttft_axis])
    return legible(figure)


def devices(summary: SimSummary) -> Figure:
    """How busy each device was, and how full its KV got."""
    stats = summary.device_stats
    ids = [str(d["id"]) for d in stats]
    named = len(ids) <= _MAX_NAMED_DEVICES
    width = min(_MAX_DEVICES_WIDTH_IN, max(6.0, 0.45 * len(ids) + 3)) if named else 12.0
    figure, axis = plt.subplots(figsize=(width, 4.5), layout="constrained")
    positions = np.arange(len(ids))
    utilization = [float(d["utilization"]) for d in stats]
    kv_peak = [
        float(d["kv_peak_tokens"]) / float(d["kv_capacity_tokens"])
        if d["kv_capacity_tokens"]
        else 0
        for d in stats
    ]
    axis.bar(positions - 0.2, utilization, width=0.4, label="busy")
    axis.bar(positions + 0.2, kv_peak, width=0.4, label="peak KV use")
    if named:
        axis.set_xticks(positions, ids, rotation=60, ha="right", rotation_mode="anchor")
    else:  # past a few dozen, names would be unreadable: devices by their place in the file
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("device (in the order of the cluster file)")
    axis.set_ylabel("fraction")
    axis.set_ylim(0, max(1.05, *kv_peak, *utilization))
    axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"{summary.cluster}\nbusy time and peak KV use per device", fontsize=10)
    legend_beside(axis)
    return legible(figure)


def _cdf(axis: Axes, values: FloatArray, label: str, style: Mapping[str, Any]) -> None:
    data = values[~np.isnan(values) & (values > 0)]
    if not len(data):
        return
    ordered = np.sort(data)
    # A few requests make a line too short to see (one makes none): mark each.
    marker = "o" if len(ordered) < _MARKED_BELOW else None
    fractions = np.arange(1, len(ordered) + 1) / len(ordered)
    axis.plot(ordered, fractions, label=label, marker=marker, markersize=3, **style)
