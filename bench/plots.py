"""Plots of scenario results (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import NullFormatter, ScalarFormatter
from PIL import Image


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


def scheduling(path: Path, result: Mapping[str, Any]) -> None:
    """Four panels: split vs colocated, the crossover, SRAM decode per dollar, policies."""
    studies = result["studies"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))

    split = studies["split_vs_colocated_70b"]
    names = ["colocated", *split["split_by_ratio"]]
    values = [split["colocated_per_gpu"], *split["split_by_ratio"].values()]
    panel = axes[0][0]
    panel.bar(names, values, color=["tab:grey"] + ["tab:blue"] * (len(names) - 1))
    panel.set_title("Llama-3.1-70B on 4 H100x4 deployments: goodput per GPU (req/s)")
    panel.set_ylabel("req/s per GPU at 90% SLO attainment")

    cells = studies["crossover_8b"]
    prompts = sorted({c["prompt_tokens"] for c in cells})
    links = sorted({c["link_gbps"] for c in cells})
    width = 0.8 / len(links)
    panel = axes[0][1]
    for offset, link in enumerate(links):
        ratios = [
            next(c["ratio"] for c in cells if c["prompt_tokens"] == p and c["link_gbps"] == link)
            for p in prompts
        ]
        positions = np.arange(len(prompts)) + offset * width
        panel.bar(positions, ratios, width, label=f"{link:.0f} Gb/s")
    panel.axhline(1.0, color="grey", linewidth=0.8)
    panel.set_xticks(np.arange(len(prompts)) + width * (len(links) - 1) / 2)
    panel.set_xticklabels([str(p) for p in prompts])
    panel.set_xlabel("prompt tokens (200 output)")
    panel.set_title("Llama-3.1-8B, 4 H100: split / colocated goodput per GPU")
    panel.legend()

    panel = axes[1][0]
    labels, hetero, colocated = [], [], []
    for trials in studies["hetero_per_dollar"].values():
        by_prefill = sorted(trials["trials"].items(), key=lambda item: int(item[0].split("x")[0]))
        for label, trial in by_prefill:
            # "8x h100 + 1x cerebras-wse3" -> "8 H100\n+ cerebras"
            prefill, decode = label.split(" + ")
            labels.append(f"{prefill.split('x')[0]} H100\n+ {decode.split()[-1].split('-')[0]}")
            hetero.append(trial["hetero_per_usd_hour"])
            colocated.append(trial["colocated_per_usd_hour"])
    slots = np.arange(len(labels), dtype=float)
    panel.bar(slots - 0.2, hetero, 0.4, label="H100 prefill + SRAM decode")
    panel.bar(slots + 0.2, colocated, 0.4, label="H100 colocated, same $/h")
    panel.set_xticks(slots)
    panel.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    panel.set_ylabel("goodput per $/h (modelled)")
    panel.set_title("Llama-3.1-70B, tight TPOT: goodput per dollar")
    panel.legend(fontsize=8)

    panel = axes[1][1]
    policies = studies["policies_by_prefix_cache_blocks"]
    order = ("round-robin", "least-outstanding", "packaged")
    names = sorted(next(iter(policies.values())), key=lambda n: order.index(n) if n in order else 9)
    width = 0.8 / len(policies)
    for offset, (blocks, rates) in enumerate(policies.items()):
        positions = np.arange(len(names)) + offset * width
        panel.bar(
            positions, [rates[n] for n in names], width, label=f"prefix cache {blocks} blocks"
        )
    panel.set_xticks(np.arange(len(names)) + width * (len(policies) - 1) / 2)
    panel.set_xticklabels(names)
    panel.set_ylabel("goodput (req/s)")
    panel.set_title("8x H100 Llama-3.1-8B, mixed workload with shared prefixes")
    panel.legend(fontsize=8)

    figure.suptitle("Scheduling studies (simulated with the mock devices' timing model)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


@dataclass(frozen=True)
class Panel:
    """One chart of a dashboard: lines over time (seconds from the start), a unit."""

    title: str
    unit: str
    lines: Mapping[str, Sequence[tuple[float, float]]]
    target: float | None = None  # a dashed line, e.g. the SLO
    log: bool = False


def dashboard(path: Path, panels: Sequence[Panel], title: str, columns: int = 2) -> None:
    """Panels in a grid, like a Grafana dashboard drawn from the same queries."""
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 3.2 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for label, points in panel.lines.items():
            if points:
                times, values = zip(*points, strict=True)
                axis.plot(times, values, label=label, linewidth=1.2)
        if panel.target is not None:
            axis.axhline(panel.target, color="grey", linestyle="--", linewidth=0.8, label="SLO")
        if panel.log:
            axis.set_yscale("log")
        axis.set_title(panel.title, fontsize=10)
        axis.set_ylabel(panel.unit)
        axis.set_xlabel("s")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="upper left")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    drawn = io.BytesIO()
    figure.savefig(drawn, dpi=90, format="png")
    plt.close(figure)
    # Lines on white need few colours: a 64-colour palette is a quarter of the bytes.
    with Image.open(drawn) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)


@dataclass(frozen=True)
class BarPanel:
    """One bar chart: a value per label (None: no bar, e.g. no router to measure)."""

    title: str
    unit: str
    values: Mapping[str, float | None]
    reference: str | None = None  # the label whose bar is drawn darker (the baseline)


def bar_panels(
    path: Path, panels: Sequence[BarPanel], title: str, columns: int = 3, note: str = ""
) -> None:
    """A bar chart per figure, its value written on each bar, ``note`` under them all.
    Axes are linear unless a panel's positive values span two decades or more."""
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        shown = {label: value for label, value in panel.values.items() if value is not None}
        labels, values = list(shown), list(shown.values())
        colours = ["tab:grey" if label == panel.reference else "tab:blue" for label in labels]
        axis.bar(range(len(values)), values, color=colours)
        positive = [v for v in values if v > 0]
        if positive and min(values) > 0 and max(positive) / min(positive) >= 100:
            axis.set_yscale("log")
        for index, value in enumerate(values):
            axis.annotate(
                f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}",
                (index, value),
                textcoords="offset points",
                xytext=(0, 2),
                ha="center",
                fontsize=8,
            )
        axis.axhline(0, color="grey", linewidth=0.6)
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
        axis.set_title(panel.title, fontsize=10)
        axis.set_ylabel(panel.unit)
        axis.grid(axis="y", alpha=0.3)
        axis.margins(y=0.15)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    if note:
        figure.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, wrap=True)
    figure.tight_layout(rect=(0, 0.04 if note else 0, 1, 0.97))
    figure.savefig(path, dpi=90)
    plt.close(figure)
