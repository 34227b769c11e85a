"""Plots of a simulated run (PNG). Needs matplotlib, the ``plots`` extra.

Only ``router.sim.report`` loads this module, when it writes a run's results: the
daemon and the rest of the simulator never import matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

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


def write_all(out: Path, result: SimResult, summary: SimSummary) -> None:
    latency(out / LATENCY_PLOT, result, summary)
    timeline(out / TIMELINE_PLOT, result)
    devices(out / DEVICES_PLOT, summary)


def latency(path: Path, result: SimResult, summary: SimSummary) -> None:
    """CDFs of TTFT and TPOT over completed requests, split and colocated apart."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ok = result.ok
    for axis, values, title in (
        (axes[0], result.ttft_s, "TTFT (ms)"),
        (axes[1], result.tpot_s, "TPOT (ms)"),
    ):
        for label, mask in (
            ("all", ok),
            ("split", ok & result.split),
            ("colocated", ok & ~result.split),
        ):
            _cdf(axis, values[mask] * 1e3, label)
        axis.set_title(title)
        axis.set_xscale("log")
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{summary.cluster}: {summary.requests} requests")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def timeline(path: Path, result: SimResult) -> None:
    """Arrivals and mean TTFT over time: where the queues built up."""
    figure, axis = plt.subplots(figsize=(11, 4.5))
    end = max(float(result.arrival_s.max(initial=0.0)), 1e-9)
    bins = min(_MAX_TIMELINE_BINS, max(_MIN_TIMELINE_BINS, result.requests // _ARRIVALS_PER_BIN))
    edges = np.linspace(0.0, end, bins + 1)
    counts, _ = np.histogram(result.arrival_s, edges)
    width = edges[1] - edges[0]
    centers = (edges[:-1] + edges[1:]) / 2
    axis.plot(centers, counts / width, color="tab:grey", label="arrivals (req/s)")
    axis.set_xlabel("time since start (s)")
    axis.set_ylabel("requests per second")
    ttft_axis = axis.twinx()
    ok = result.ok
    sums, _ = np.histogram(result.arrival_s[ok], edges, weights=result.ttft_s[ok])
    served, _ = np.histogram(result.arrival_s[ok], edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_ttft = sums / served * 1e3
    ttft_axis.plot(centers, mean_ttft, color="tab:red", label="mean TTFT (ms)")
    ttft_axis.set_ylabel("mean TTFT of arrivals (ms)")
    axis.grid(alpha=0.3)
    figure.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def devices(path: Path, summary: SimSummary) -> None:
    """How busy each device was, and how full its KV got."""
    stats = summary.device_stats
    ids = [str(d["id"]) for d in stats]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(ids) + 2), 4.5))
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
    axis.set_xticks(positions, ids, rotation=60, ha="right")
    axis.set_ylabel("fraction")
    axis.set_ylim(0, max(1.05, *kv_peak, *utilization))
    axis.grid(alpha=0.3, axis="y")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _cdf(axis: Axes, values: FloatArray, label: str) -> None:
    data = values[~np.isnan(values) & (values > 0)]
    if not len(data):
        return
    ordered = np.sort(data)
    axis.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
