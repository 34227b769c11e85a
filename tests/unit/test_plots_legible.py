"""Plots a person can read, checked on the drawn figures: no text over another, none off
the figure, more than one plain number on every log axis, legends clear of the panels,
and lines that coincide still told apart.

Each figure is drawn from small inputs the test makes; the checks read the window
extents matplotlib lays out, as a PNG would show them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "matplotlib", reason="matplotlib (the plots and bench extras) is not installed: no figures"
)

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.axes._base import _AxesBase
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from bench import plots
from bench.chaos import plot as chaos_plot
from bench.chaos.timeline import RequestPoint, Timeline
from router.scheduling.slo import SLO_PRESETS
from router.sim import plots as sim_plots
from router.sim.axes import LINE_STYLES, legible, plain
from router.sim.cluster import parse_cluster
from router.sim.policy import resolve_policy
from router.sim.results import SimResult
from router.sim.simulator import Simulator
from router.sim.workload import generate

# Two boxes closer than this (pixels) in both directions count as overlapping.
TOUCH_PX = 0.5


# ------------------------------------------------------------------ what a figure shows


def panels(figure: Figure) -> list[_AxesBase]:
    """Every visible panel, with the secondary axes drawn inside them."""
    out: list[_AxesBase] = [axis for axis in figure.axes if axis.get_visible()]
    return out + [child for axis in out for child in axis.child_axes]


def title(panel: _AxesBase) -> str:
    return panel.get_title() if isinstance(panel, Axes) else "(secondary axis)"


def drawn_tick_labels(axis: Axis, *, minor: bool = False) -> list[Text]:
    """The tick labels of ``axis`` that a saved PNG shows (inside its view, not empty)."""
    low, high = sorted(axis.get_view_interval())
    span = high - low
    locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
    ticks = axis.get_minor_ticks(len(locs)) if minor else axis.get_major_ticks(len(locs))
    labels = []
    for loc, tick in zip(locs, ticks, strict=True):
        if not low - 1e-9 * span <= loc <= high + 1e-9 * span:
            continue
        labels += [
            label
            for label in (tick.label1, tick.label2)
            if label.get_visible() and label.get_text().strip()
        ]
    return labels


def every_tick_label(figure: Figure) -> Iterator[Text]:
    for panel in panels(figure):
        for axis in (panel.xaxis, panel.yaxis):
            yield from drawn_tick_labels(axis)
            yield from drawn_tick_labels(axis, minor=True)


def shown_texts(figure: Figure) -> list[Text]:
    """Every text the figure shows: tick labels in view, titles, axis labels, legends,
    annotations."""
    ticks = {
        id(label)
        for panel in panels(figure)
        for axis in (panel.xaxis, panel.yaxis)
        for tick in (*axis.get_major_ticks(), *axis.get_minor_ticks())
        for label in (tick.label1, tick.label2)
    }
    others = [
        text
        for text in figure.findobj(Text)
        if id(text) not in ticks and text.get_visible() and text.get_text().strip()
    ]
    return [*every_tick_label(figure), *others]


def overlap(a: Bbox, b: Bbox) -> bool:
    across = float(min(a.x1, b.x1) - max(a.x0, b.x0))
    down = float(min(a.y1, b.y1) - max(a.y0, b.y0))
    return across > TOUCH_PX and down > TOUCH_PX


def dashes(line: Line2D) -> str:
    """A line's dash pattern as drawn (its style name says only "--" for any pattern)."""
    return str(vars(line)["_unscaled_dash_pattern"])


def legends(figure: Figure) -> list[Legend]:
    found = list(figure.legends)
    found += [legend for panel in panels(figure) if (legend := panel.get_legend()) is not None]
    return found


def assert_readable(figure: Figure) -> None:
    """What a reader needs of every figure, read after laying it out as it is saved."""
    figure.canvas.draw()
    texts = shown_texts(figure)
    boxes = [(text, text.get_window_extent()) for text in texts]
    page = figure.bbox
    for text, box in boxes:
        inside = Bbox.from_extents(page.x0 - 1, page.y0 - 1, page.x1 + 1, page.y1 + 1)
        assert inside.contains(box.x0, box.y0), f"{text.get_text()!r} is cut off"
        assert inside.contains(box.x1, box.y1), f"{text.get_text()!r} is cut off"
    for (one, one_box), (other, other_box) in itertools.combinations(boxes, 2):
        assert not overlap(one_box, other_box), f"{one.get_text()!r} overlaps {other.get_text()!r}"
    for panel in panels(figure):
        for axis in (panel.xaxis, panel.yaxis):
            labels = [label.get_text() for label in drawn_tick_labels(axis)]
            if axis.get_scale() == "log":
                assert len(labels) > 1, f"a log axis of {title(panel)!r} reads {labels}"
            assert not any("$" in label or "10^" in label for label in labels), labels
    for legend in legends(figure):
        frame = legend.get_window_extent()
        own = {id(text) for text in legend.get_texts()} | {id(legend.get_title())}
        for panel in panels(figure):
            assert not overlap(frame, panel.get_window_extent()), (
                f"a legend lies on the panel {title(panel)!r}"
            )
        for text, box in boxes:
            if id(text) not in own:
                assert not overlap(frame, box), f"a legend covers {text.get_text()!r}"


@pytest.fixture(autouse=True)
def _closed() -> Iterator[None]:
    yield
    plt.close("all")


# ------------------------------------------------------------------ the log axes themselves


def test_plain_numbers() -> None:
    assert [plain(v) for v in (0.05, 0.5, 1.5, 2.0, 30.0, 700.0, 1500.0, 20000.0)] == [
        "0.05",
        "0.5",
        "1.5",
        "2",
        "30",
        "700",
        "1,500",
        "20,000",
    ]


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (2.2, 9.0),  # inside one decade: a plain log axis labels nothing, or one tick
        (0.45, 4.5),  # across one boundary: a plain log axis labels one tick
        (12.0, 5800.0),
        (1e-3, 1e6),  # nine decades on a small panel: not every decade fits
    ],
)
def test_a_log_axis_gets_several_labels_that_do_not_touch(low: float, high: float) -> None:
    figure, axis = plt.subplots(figsize=(4, 3), layout="constrained")
    values = np.geomspace(low, high, 50)
    axis.plot(values, np.linspace(0, 1, 50))
    axis.set_xscale("log")
    legible(figure)
    assert axis.get_xscale() == "log"
    assert_readable(figure)
    labels = [float(t.get_text().replace(",", "")) for t in drawn_tick_labels(axis.xaxis)]
    assert labels == sorted(labels)
    assert labels[-1] / labels[0] >= (high / low) ** 0.5  # spread over the range


def test_a_log_axis_over_a_narrow_range_becomes_linear() -> None:
    figure, axis = plt.subplots(figsize=(5, 3), layout="constrained")
    axis.plot([1.33, 1.5, 1.92], [0.0, 0.5, 1.0])
    axis.set_xscale("log")
    legible(figure)
    assert axis.get_xscale() == "linear"
    assert_readable(figure)
    assert len(drawn_tick_labels(axis.xaxis)) >= 3


# ------------------------------------------------------------------ the simulator's plots


@pytest.fixture(scope="module")
def simulated() -> SimResult:
    cluster = parse_cluster(
        {
            "model": "llama-3.1-8b",
            "groups": [
                {"name": "p", "profile": "h100", "role": "prefill", "count": 1},
                {"name": "d", "profile": "h100", "role": "decode", "count": 1},
                {"name": "c", "profile": "h100", "role": "both", "count": 1},
            ],
        }
    )
    requests = generate("chatbot", 150, rate_per_s=10.0, seed=5)
    return Simulator(cluster, resolve_policy(None)).run(requests)


def test_the_simulators_plots_are_readable(simulated: SimResult) -> None:
    summary = simulated.summary(SLO_PRESETS["chatbot"])
    for figure in (
        sim_plots.latency(simulated, summary),
        sim_plots.timeline(simulated),
        sim_plots.devices(summary),
    ):
        assert_readable(figure)


def test_all_requests_stay_visible_under_the_modes(simulated: SimResult) -> None:
    """Where every request took one mode, "all" and that mode are one curve: "all" is
    drawn wider and beneath, so both show."""
    figure = sim_plots.latency(simulated, simulated.summary(None))
    for axis in figure.axes:
        lines = {str(line.get_label()).split(" (")[0]: line for line in axis.get_lines()}
        everything = lines.pop("all")
        for mode in lines.values():
            assert everything.get_linewidth() > 2 * mode.get_linewidth()
            assert everything.get_zorder() < mode.get_zorder()
        styles = {dashes(line) for line in lines.values()}
        assert len(styles) == len(lines)


def test_a_large_fleets_devices_plot_keeps_its_size(simulated: SimResult) -> None:
    summary = simulated.summary(None)
    many = summary.__class__(**{**summary.__dict__, "device_stats": summary.device_stats * 100})
    figure = sim_plots.devices(many)
    assert figure.get_figwidth() <= 20
    assert_readable(figure)


# ------------------------------------------------------------------ the bench's plots


def samples(median: float, spread: float, count: int = 200, seed: int = 0) -> list[float]:
    return list(np.random.default_rng(seed).lognormal(math.log(median), spread, count))


def test_cdfs_inside_one_decade_read_as_numbers() -> None:
    """The http_pd case: every value between 0.5 and 3 ms, once labelled by a lone "1"."""
    series = {
        "direct to decode engine": samples(0.7, 0.15),
        "router split (vllm adapter)": samples(1.9, 0.1, seed=1),
    }
    figure = plots.cdfs_figure(series, "TTFT of streamed completions over HTTP (ms)")
    assert_readable(figure)
    assert len(drawn_tick_labels(figure.axes[0].xaxis)) >= 4


def test_the_overhead_plot_is_readable() -> None:
    figure = plots.overhead_figure(
        {
            "direct": samples(0.6, 0.3),
            "router": samples(1.6, 0.2),
            "router-split": samples(2.5, 0.1),
        },
        {"direct": samples(3.0, 0.4), "router": samples(4.5, 0.4)},
        {"direct": samples(10.0, 0.05), "router": samples(10.0, 0.05, seed=2)},
        {"load_rate_per_s": 354.0, "stream_throughput_ratio": 0.99, "saturated_stream_ratio": 1.6},
    )
    assert_readable(figure)
    lines = [
        line for axis in figure.axes for line in axis.get_lines() if line.get_label() == "router"
    ]
    assert len({line.get_color() for line in lines}) == 1  # one colour per series, every panel


def scheduling_result() -> dict[str, Any]:
    def trials(decode: str, per_dollar: Sequence[float]) -> dict[str, Any]:
        return {
            f"{count}x h100 + 1x {decode}": {
                "hetero_per_usd_hour": value,
                "colocated_per_usd_hour": 0.22,
            }
            for count, value in zip((1, 2, 4, 8, 16), per_dollar, strict=True)
        }

    return {
        "studies": {
            "split_vs_colocated_70b": {
                "colocated_per_gpu": 1.5,
                "split_by_ratio": {"1P3D": 0.97, "2P2D": 2.19, "3P1D": 3.38},
            },
            "crossover_8b": [
                {"prompt_tokens": tokens, "link_gbps": link, "ratio": ratio}
                for tokens, ratio in ((32, 1.2), (128, 0.89), (512, 0.97), (2048, 0.95))
                for link in (100.0, 7200.0)
            ],
            "hetero_per_dollar": {
                "cerebras-wse3": {"trials": trials("cerebras-wse3", (0.05, 0.1, 0.18, 0.29, 0.21))},
                "groq-lpu": {"trials": trials("groq-lpu", (0.03, 0.07, 0.14, 0.12, 0.09))},
            },
            "policies_by_prefix_cache_blocks": {
                "1024": {"round-robin": 74.0, "least-outstanding": 76.0, "packaged": 92.0},
                "4096": {"round-robin": 90.0, "least-outstanding": 92.0, "packaged": 126.0},
            },
        }
    }


def test_the_scheduling_plot_is_readable_at_the_default_size() -> None:
    figure = plots.scheduling_figure(scheduling_result())
    assert_readable(figure)
    for text in every_tick_label(figure):
        assert text.get_fontproperties().get_size_in_points() >= 9, text.get_text()
        assert text.get_rotation() == 0, text.get_text()


def test_a_dashboards_coinciding_lines_are_told_apart() -> None:
    times = [float(t) for t in range(0, 300, 5)]

    def flat(value: float) -> list[tuple[float, float]]:
        return [(t, value) for t in times]

    figure = plots.dashboard_figure(
        [
            plots.Panel("shed by reason", "req/s", {r: flat(0.0) for r in ("a", "b", "c", "d")}),
            plots.Panel(
                "latency", "ms", {"p99": flat(900.0), "p50": flat(15.0), "p90": flat(7.5)}, log=True
            ),
            plots.Panel("attainment", "ratio", {"5m": flat(1.0), "1h": flat(1.0)}, target=0.99),
            plots.Panel(
                "failures",
                "req/s",
                {f"failed backend-{n} leg-{n % 4}": flat(0.0) for n in range(16)},
            ),
        ],
        "a dashboard",
        columns=2,
    )
    assert_readable(figure)
    for axis in figure.axes:
        lines = [line for line in axis.get_lines() if line.get_label() != "SLO"]
        styles = [dashes(line) for line in lines[: len(LINE_STYLES)]]
        assert len(set(styles)) == len(styles), axis.get_title()


def chaos_inputs() -> tuple[Mapping[str, Any], Timeline]:
    bins = 60
    tokens = [400 + 50 * (i % 7) for i in range(bins)]
    series = {
        "tokens_fault_free": tokens,
        "tokens_chaos": [t - (100 if 20 <= i < 25 else 0) for i, t in enumerate(tokens)],
        "completed_fault_free": [4] * bins,
        "completed_chaos": [4] * bins,
        "errors_chaos": [1 if i == 22 else 0 for i in range(bins)],
        "lost_chaos": [0] * bins,
    }
    points = [
        RequestPoint(i * 0.5, 0.02 + 0.001 * (i % 40) + (3.0 if i == 45 else 0), 1.0, "complete")
        for i in range(120)
    ]
    result = {
        "mode": "quick",
        "cluster": [{"id": "p0", "role": "prefill"}, {"id": "d0", "role": "decode"}],
        "faults": {
            "records": [
                {"applied_s": 20.0, "back_s": 25.0, "kind": "kill", "device": "d0"},
                {"applied_s": 40.0, "back_s": None, "kind": "stop", "device": "p0"},
            ]
        },
        "timeline": {"router_unhealthy": {"d0": [[20.5, 26.0]]}},
        "figures": {
            "faults_injected": 2,
            "requests": 120,
            "requests_lost": 0,
            "tokens_differ": 0,
            "errors_before_first_token": 1,
            "errors_after_first_token": 0,
            "goodput_drop": 0.02,
        },
    }
    return result, Timeline(1.0, series, points)


def test_the_chaos_plot_is_readable_and_shows_the_fault_free_run_under_it() -> None:
    figure = chaos_plot.figure_of(*chaos_inputs())
    assert_readable(figure)
    tokens = figure.axes[0]
    free, chaos = (p for p in tokens.patches if p.get_label() in {"fault-free run", "chaos run"})
    assert free.get_linewidth() > 2 * chaos.get_linewidth()


def test_bar_panels_read_level_with_a_log_axis_where_values_span_decades() -> None:
    names = ("vllm-router (Rust)", "sglang-router (Rust)", "hetero-router gRPC", "a relay")
    figure = plots.bar_panels_figure(
        [
            plots.BarPanel(
                "added TTFT p50", "ms", dict(zip(names, (1.2, 41.0, 1.1, None), strict=True))
            ),
            plots.BarPanel(
                "memory after", "MiB", dict(zip(names, (0.5, 28.0, 130.0, 55.0), strict=True))
            ),
        ],
        "routers, one run",
        columns=2,
        note="a note under every panel, long enough to be wrapped " * 4,
    )
    assert_readable(figure)
    assert figure.axes[1].get_xscale() == "log"
    for text in every_tick_label(figure):
        assert text.get_rotation() == 0, text.get_text()
