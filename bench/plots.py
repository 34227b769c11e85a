"""Plots of scenario results (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import NullFormatter, ScalarFormatter


def _cdf(axis: Axes, values: Sequence[float], label: str) -> None:
    if not values:
        return
    ordered = np.sort(np.asarray(values))
    axis.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)


def _cdf_panel(axis: Axes, series: Mapping[str, Sequence[float]], title: str) -> None:
    """One CDF per series on a log axis with plain numbers."""
    for name, values in series.items():
        _cdf(axis, values, name)
    axis.set_title(title)
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_ylabel("fraction of requests")
    axis.grid(alpha=0.3)
    axis.legend()


def overhead(
    path: Path,
    ttft: Mapping[str, Sequence[float]],
    load_ttft: Mapping[str, Sequence[float]],
    paced_itl: Mapping[str, Sequence[float]],
    figures: Mapping[str, float],
) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], ttft, "TTFT, sequential (ms)"),
        (axes[0][1], load_ttft, f"TTFT at {figures['load_rate_per_s']:.0f} req/s (ms)"),
        (axes[1][0], paced_itl, "inter-token gap, 100 paced streams (ms)"),
    ]
    for axis, series, title in panels:
        _cdf_panel(axis, series, title)
    ratios = {
        "paced streams": figures["stream_throughput_ratio"],
        "saturated streams": figures["saturated_stream_ratio"],
    }
    bars = axes[1][1]
    bars.bar(list(ratios), list(ratios.values()), color=["tab:blue", "tab:orange"])
    bars.axhline(1.0, color="grey", linewidth=0.8)
    bars.set_ylim(0, max(1.2, *ratios.values()) * 1.15)
    bars.set_title("tokens/s through the router / direct")
    for index, value in enumerate(ratios.values()):
        bars.text(index, value + 0.02, f"{value:.2f}", ha="center")
    figure.suptitle("Router overhead against direct device access (same run)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def cdfs(path: Path, series: Mapping[str, Sequence[float]], title: str) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    _cdf_panel(axis, series, title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
