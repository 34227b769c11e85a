"""Axes a person can read: log scales labelled across their range, labels that do not
overlap, legends beside the data, and lines that stay visible where they coincide.

Every plot of the project (the simulator's here, the bench's in ``bench/plots.py``)
lays its figure out with matplotlib's constrained layout, puts its legends with
``legend_below`` or ``legend_beside``, and returns it through ``legible``, so that
what a test reads of a figure is what ``save`` writes. Needs matplotlib (the ``plots``
extra): only the drawing modules import this one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.axis import Axis, XAxis
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullFormatter,
    ScalarFormatter,
)

# A log axis whose values span less than this factor reads better as a linear one: a
# decade would hold one or two ticks, and the eye reads a linear spacing.
LINEAR_BELOW = 3.0
# The mantissas labelled in each decade, densest first; the first whose labels fit
# without touching is taken, then every decade, every second decade, and so on.
_MANTISSAS = ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0), (1.0, 2.0, 3.0, 5.0), (1.0, 2.0, 5.0), (1.0, 3.0))
_DECADE_STRIDES = (1, 2, 3, 5, 10, 20)
# Space kept clear between two tick labels, as a share of their font size.
_LABEL_GAP_EM = 0.6
# Dash patterns for the lines of one panel, in order: two lines that coincide still
# show each other's colour in the gaps.
LINE_STYLES: tuple[str | tuple[float, tuple[float, ...]], ...] = (
    "-",
    (0.0, (5.0, 2.0)),
    (0.0, (1.5, 1.5)),
    (0.0, (7.0, 2.0, 1.5, 2.0)),
)
_LEGEND_COLUMNS = 4


def plain(value: float) -> str:
    """A tick's number as a person writes it: 0.5, 2, 30, 1,500, never 3x10^0."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


def line_style(index: int) -> str | tuple[float, tuple[float, ...]]:
    """The dash pattern of a panel's ``index``-th line."""
    return LINE_STYLES[index % len(LINE_STYLES)]


def legend_below(figure: Figure, axes: Iterable[Axes], **options: object) -> Legend | None:
    """One legend for the whole figure, under its panels, for panels that share their
    series (the same label is listed once). Needs constrained layout."""
    handles: list[Artist] = []
    labels: list[str] = []
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if not handles:
        return None
    # As many columns as fit across the figure (an entry: its marker, then its label).
    font_pt = FontProperties(size=matplotlib.rcParams["legend.fontsize"]).get_size_in_points()
    entry_pt = (max(len(label) for label in labels) * 0.55 + 5) * font_pt
    across = int(figure.get_figwidth() * 72 // entry_pt)
    columns = max(1, min(len(labels), _LEGEND_COLUMNS, across))
    return figure.legend(
        handles, labels, loc="outside lower center", ncols=columns, frameon=False, **options
    )


def legend_beside(axis: Axes, **options: object) -> Legend | None:
    """The panel's own legend, to the right of it, clear of its data and its labels."""
    if not axis.get_legend_handles_labels()[0]:
        return None
    return axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **options)


def legible(figure: Figure) -> Figure:
    """Readable ticks on every log axis of ``figure`` (laid out as it will be saved):
    linear where the values span little, else plain numbers at as many mantissas per
    decade as fit without one label touching the next. Returns the figure."""
    log_axes = [
        axis
        for panel in figure.axes
        for axis in (panel.xaxis, panel.yaxis)
        if axis.get_scale() == "log"
    ]
    for axis in log_axes:
        low, high = sorted(axis.get_view_interval())
        if low > 0 and high / low < LINEAR_BELOW:
            _linear(axis)
    log_axes = [axis for axis in log_axes if axis.get_scale() == "log"]
    # Twice: the first fit changes the labels' widths, so the layout, so the room.
    for _ in range(2 if log_axes else 0):
        figure.draw_without_rendering()
        probe = figure.text(0, 0, "")  # measures labels; removed before anything draws it
        try:
            for axis in log_axes:
                _fit_log_ticks(axis, probe)
        finally:
            probe.remove()
    return figure


def save(figure: Figure, target: Path | IO[bytes], *, dpi: int = 90, **options: object) -> None:
    """Writes ``figure`` (made ``legible`` by whoever drew it) as PNG and frees it."""
    try:
        figure.savefig(target, dpi=dpi, format="png", **options)  # type: ignore[arg-type]  # savefig's options are untyped keywords
    finally:
        plt.close(figure)


def _linear(axis: Axis) -> None:
    panel = axis.axes
    if isinstance(axis, XAxis):
        panel.set_xscale("linear")
    else:
        panel.set_yscale("linear")
    axis.set_major_formatter(ScalarFormatter(useOffset=False))
    panel.autoscale_view()


def _fit_log_ticks(axis: Axis, probe: Text) -> None:
    low, high = sorted(axis.get_view_interval())
    if not low > 0:
        return
    labels = axis.get_ticklabels()
    font = labels[0].get_fontproperties() if labels else FontProperties()
    chosen: list[float] = []
    for ticks in _candidates(low, high):
        if len(ticks) < 2:
            continue
        chosen = ticks
        if not _crowded(axis, ticks, font, probe):
            break
    if not chosen:  # not one decade boundary or mantissa inside: the ends say it
        chosen = [low, high]
    axis.set_major_locator(FixedLocator(chosen))
    axis.set_major_formatter(FuncFormatter(lambda value, _: plain(value)))
    axis.set_minor_locator(LogLocator(base=10.0, subs=tuple(np.arange(2.0, 10.0))))
    axis.set_minor_formatter(NullFormatter())


def _candidates(low: float, high: float) -> Iterable[list[float]]:
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    decades = range(first, last + 1)

    def inside(values: Iterable[float]) -> list[float]:
        return [v for v in values if low * (1 - 1e-9) <= v <= high * (1 + 1e-9)]

    for mantissas in _MANTISSAS:
        yield inside(m * 10.0**e for e in decades for m in mantissas)
    for stride in _DECADE_STRIDES:
        yield inside(10.0**e for e in decades if e % stride == 0)


def _crowded(axis: Axis, ticks: Sequence[float], font: FontProperties, probe: Text) -> bool:
    """Whether two neighbouring labels of ``ticks`` would come closer than the gap."""
    panel = axis.axes
    horizontal = isinstance(axis, XAxis)
    if horizontal:
        places = panel.get_xaxis_transform().transform([(t, 0.0) for t in ticks])[:, 0]
    else:
        places = panel.get_yaxis_transform().transform([(0.0, t) for t in ticks])[:, 1]
    sizes = []
    for tick in ticks:
        extent = _text_extent(probe, plain(tick), font)
        sizes.append(extent[0] if horizontal else extent[1])
    em = _text_extent(probe, "M", font)[1]
    order = np.argsort(places)
    for left, right in itertools.pairwise(order):
        room = abs(places[right] - places[left]) - (sizes[left] + sizes[right]) / 2
        if room < _LABEL_GAP_EM * em:
            return True
    return False


def _text_extent(probe: Text, text: str, font: FontProperties) -> tuple[float, float]:
    """Width and height in pixels of ``text`` drawn in ``font``."""
    probe.set_text(text)
    probe.set_fontproperties(font)
    box = probe.get_window_extent()
    return float(box.width), float(box.height)
