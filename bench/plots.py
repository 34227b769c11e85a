"""Plots of scenario results (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import ScaledTranslation
from PIL import Image

from router.sim.axes import legend_below, legend_beside, legible, line_style, save

# A panel's legend beside it takes a second column past this many entries.
_LEGEND_ROWS = 12


def _styles(series: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A colour and a dash pattern per series name, the same in every panel."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(series))
    return {
        name: {"color": colours[index % len(colours)], "linestyle": line_style(index)}
        for index, name in enumerate(names)
    }


def _cdf(axis: Axes, values: Sequence[float], label: str, style: Mapping[str, Any]) -> None:
    if not values:
        return
    ordered = np.sort(np.asarray(values))
    axis.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label, **style)


def _cdf_panel(
    axis: Axes,
    series: Mapping[str, Sequence[float]],
    title: str,
    styles: Mapping[str, Mapping[str, Any]],
) -> None:
    """One CDF per series on a log axis (``legible`` labels it)."""
    for name, values in series.items():
        _cdf(axis, values, name, styles[name])
    axis.set_title(title)
    axis.set_xscale("log")
    axis.set_ylabel("fraction of requests")
    axis.grid(alpha=0.3)


def overhead(
    path: Path,
    ttft: Mapping[str, Sequence[float]],
    load_ttft: Mapping[str, Sequence[float]],
    paced_itl: Mapping[str, Sequence[float]],
    figures: Mapping[str, float],
) -> None:
    save(overhead_figure(ttft, load_ttft, paced_itl, figures), path)


def overhead_figure(
    ttft: Mapping[str, Sequence[float]],
    load_ttft: Mapping[str, Sequence[float]],
    paced_itl: Mapping[str, Sequence[float]],
    figures: Mapping[str, float],
) -> Figure:
    figure, axes = plt.subplots(2, 2, figsize=(11, 8.5), layout="constrained")
    panels = [
        (axes[0][0], ttft, "TTFT, sequential (ms)"),
        (axes[0][1], load_ttft, f"TTFT at {figures['load_rate_per_s']:.0f} req/s (ms)"),
        (axes[1][0], paced_itl, "inter-token gap, 100 paced streams (ms)"),
    ]
    styles = _styles(name for _, series, _ in panels for name in series)
    for axis, series, title in panels:
        _cdf_panel(axis, series, title, styles)
    ratios = {
        "paced streams": figures["stream_throughput_ratio"],
        "saturated streams": figures["saturated_stream_ratio"],
    }
    bars = axes[1][1]
    # Grey: the lines' colours name series, and these bars are none of them.
    bars.bar(list(ratios), list(ratios.values()), color="tab:grey", width=0.5)
    bars.axhline(1.0, color="black", linewidth=0.8)
    bars.set_ylim(0, max(1.2, *ratios.values()) * 1.15)
    bars.set_title("tokens/s through the router / direct")
    for index, value in enumerate(ratios.values()):
        bars.annotate(
            f"{value:.2f}", (index, value), xytext=(0, 3), textcoords="offset points", ha="center"
        )
    figure.suptitle("Router overhead against direct device access (same run)")
    legend_below(figure, [axis for axis, _, _ in panels])
    return legible(figure)


def cdfs(path: Path, series: Mapping[str, Sequence[float]], title: str) -> None:
    save(cdfs_figure(series, title), path)


def cdfs_figure(series: Mapping[str, Sequence[float]], title: str) -> Figure:
    figure, axis = plt.subplots(figsize=(7, 4.8), layout="constrained")
    _cdf_panel(axis, series, title, _styles(series))
    legend_below(figure, [axis])
    return legible(figure)


def scheduling(path: Path, result: Mapping[str, Any]) -> None:
    save(scheduling_figure(result), path)


def scheduling_figure(result: Mapping[str, Any]) -> Figure:
    """Four panels: split vs colocated, the crossover, SRAM decode per dollar, policies."""
    studies = result["studies"]
    figure, axes = plt.subplots(2, 2, figsize=(14, 9), layout="constrained")

    split = studies["split_vs_colocated_70b"]
    names = ["colocated", *split["split_by_ratio"]]
    values = [split["colocated_per_gpu"], *split["split_by_ratio"].values()]
    panel = axes[0][0]
    panel.bar(names, values, color=["tab:grey"] + ["tab:blue"] * (len(names) - 1))
    panel.set_title("Llama-3.1-70B on 4 H100x4 deployments: goodput per GPU")
    panel.set_ylabel("req/s per GPU at 90% SLO attainment")
    panel.set_xlabel("deployments: prefill P, decode D")

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
        panel.bar(positions, ratios, width, label=f"link {link:,.0f} Gb/s")
    panel.axhline(1.0, color="grey", linewidth=0.8)
    panel.set_xticks(np.arange(len(prompts)) + width * (len(links) - 1) / 2)
    panel.set_xticklabels([str(p) for p in prompts])
    panel.set_xlabel("prompt tokens (200 output)")
    panel.set_ylabel("split / colocated")
    panel.set_title("Llama-3.1-8B, 4 H100: split / colocated goodput per GPU")
    legend_beside(panel)

    _hetero_per_dollar(axes[1][0], studies["hetero_per_dollar"])

    panel = axes[1][1]
    policies = studies["policies_by_prefix_cache_blocks"]
    order = ("round-robin", "least-outstanding", "packaged")
    names = sorted(next(iter(policies.values())), key=lambda n: order.index(n) if n in order else 9)
    width = 0.8 / len(policies)
    for offset, (blocks, rates) in enumerate(policies.items()):
        positions = np.arange(len(names)) + offset * width
        panel.bar(
            positions, [rates[n] for n in names], width, label=f"prefix cache\n{blocks} blocks"
        )
    panel.set_xticks(np.arange(len(names)) + width * (len(policies) - 1) / 2)
    panel.set_xticklabels(names)
    panel.set_xlabel("policy")
    panel.set_ylabel("goodput (req/s)")
    panel.set_title("8x H100 Llama-3.1-8B, mixed workload with shared prefixes")
    legend_beside(panel)

    figure.suptitle("Scheduling studies (simulated with the mock devices' timing model)")
    return legible(figure)


def _hetero_per_dollar(panel: Axes, studies: Mapping[str, Any]) -> None:
    """Bars per prefill count, grouped by the SRAM decode device under them."""
    ticks: list[float] = []
    tick_labels: list[str] = []
    groups: list[tuple[float, str]] = []
    hetero: list[float] = []
    colocated: list[float] = []
    slot = 0.0
    for decode, study in studies.items():
        trials = sorted(study["trials"].items(), key=lambda item: int(item[0].split("x")[0]))
        first = slot
        for label, trial in trials:
            ticks.append(slot)
            tick_labels.append(label.split("x")[0])  # "8x h100 + 1x cerebras-wse3" -> "8"
            hetero.append(trial["hetero_per_usd_hour"])
            colocated.append(trial["colocated_per_usd_hour"])
            slot += 1
        groups.append(((first + slot - 1) / 2, f"+ 1 {decode} decode"))
        slot += 0.6  # a gap between the groups
    positions = np.asarray(ticks)
    panel.bar(positions - 0.2, hetero, 0.4, label="H100 prefill\n+ SRAM decode")
    panel.bar(positions + 0.2, colocated, 0.4, label="H100 colocated,\nsame $/h")
    panel.set_xticks(ticks, tick_labels)
    # The decode device of each group, a line under the prefill counts.
    under = panel.secondary_xaxis(
        0, transform=panel.transAxes + ScaledTranslation(0, -16 / 72, panel.figure.dpi_scale_trans)
    )
    under.set_xticks([centre for centre, _ in groups], [name for _, name in groups])
    under.tick_params(length=0)
    under.spines["bottom"].set_visible(False)
    under.set_xlabel("H100 prefill deployments")
    panel.set_ylabel("goodput per $/h (modelled)")
    panel.set_title("Llama-3.1-70B, tight TPOT: goodput per dollar")
    legend_beside(panel)


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
    drawn = io.BytesIO()
    save(dashboard_figure(panels, title, columns), drawn)
    # Lines on white need few colours: a 64-colour palette is a quarter of the bytes.
    with Image.open(drawn) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)


def dashboard_figure(panels: Sequence[Panel], title: str, columns: int = 2) -> Figure:
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(9 * columns, 3.4 * rows), squeeze=False, layout="constrained"
    )
    for axis, panel in zip(axes.flat, panels, strict=False):
        for index, (label, points) in enumerate(panel.lines.items()):
            if points:
                times, values = zip(*points, strict=True)
                # Each line its own dash pattern: several series often sit on one value
                # (all at 0, all at 1), and the last drawn would hide the others.
                axis.plot(times, values, label=label, linewidth=1.2, linestyle=line_style(index))
        if panel.target is not None:
            axis.axhline(panel.target, color="grey", linestyle="--", linewidth=0.8, label="SLO")
        if panel.log:
            axis.set_yscale("log")
        axis.set_title(panel.title, fontsize=10)
        axis.set_ylabel(panel.unit)
        axis.set_xlabel("s")
        axis.grid(alpha=0.3)
        entries = len(axis.get_legend_handles_labels()[1])
        legend_beside(axis, fontsize=7, ncols=1 if entries <= _LEGEND_ROWS else 2)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    return legible(figure)


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
    save(bar_panels_figure(panels, title, columns, note), path)


def bar_panels_figure(
    panels: Sequence[BarPanel], title: str, columns: int = 3, note: str = ""
) -> Figure:
    """A bar chart per figure, its value written at each bar, ``note`` under them all.
    Bars lie horizontal, so that their labels read level at full size; axes are linear
    unless a panel's positive values span two decades or more."""
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(5.6 * columns, 3.6 * rows), squeeze=False, layout="constrained"
    )
    for axis, panel in zip(axes.flat, panels, strict=False):
        shown = {label: value for label, value in panel.values.items() if value is not None}
        labels, values = list(shown), list(shown.values())
        colours = ["tab:grey" if label == panel.reference else "tab:blue" for label in labels]
        places = range(len(values))
        axis.barh(places, values, color=colours)
        positive = [v for v in values if v > 0]
        if positive and min(values) > 0 and max(positive) / min(positive) >= 100:
            axis.set_xscale("log")
        else:
            axis.axvline(0, color="grey", linewidth=0.6)
        for index, value in enumerate(values):
            axis.annotate(
                f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}",
                (value, index),
                textcoords="offset points",
                xytext=(3, 0),
                va="center",
                fontsize=8,
            )
        axis.set_yticks(list(places), labels)
        axis.invert_yaxis()  # the first label on top, as the panel lists them
        axis.set_title(panel.title, fontsize=10)
        axis.set_xlabel(panel.unit)
        axis.grid(axis="x", alpha=0.3)
        axis.margins(x=0.2)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    if note:
        width = int(figure.get_figwidth() * 72 / (0.55 * 8))  # characters of 8 pt per line
        figure.supxlabel("\n".join(textwrap.wrap(note, width)), fontsize=8)
    return legible(figure)
