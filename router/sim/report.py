"""A run's figures for people and for files: a summary, JSON, per-request CSV, plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from router.console import render, table
from router.sim.planner import PlanResult, PlanTrial
from router.sim.results import SimResult, SimSummary

RESULTS_FILE = "results.json"
REQUESTS_FILE = "requests.csv"
PLAN_FILE = "plan.json"
PLAN_CLUSTER_FILE = "recommended-cluster.yaml"
PLOTS_INSTALL = "pip install 'hetero-router[plots]'"


def format_summary(summary: SimSummary) -> str:
    """The figures a reader looks for first: a table of one figure per row."""
    ttft, tpot = summary.ttft_s, summary.tpot_s
    rows = [
        (
            "cluster",
            f"{summary.cluster}  ({summary.devices} devices, ${summary.price_per_hour_usd:,.2f}/h)",
        ),
        (
            "requests",
            f"{summary.requests}: "
            + ", ".join(f"{n} {outcome}" for outcome, n in sorted(summary.outcomes.items()))
            + f"; {_percent(summary.split_fraction)} split",
        ),
        (
            "simulated",
            f"{summary.makespan_s:,.1f} s in {summary.wall_s:.1f} s wall, "
            f"{summary.cpu_s:.1f} s CPU" + ("  (stopped early)" if summary.stopped_early else ""),
        ),
        ("TTFT ms", f"mean {_ms(ttft.mean)}  p50 {_ms(ttft.p50)}  p99 {_ms(ttft.p99)}"),
        ("TPOT ms", f"mean {_ms(tpot.mean)}  p50 {_ms(tpot.p50)}  p99 {_ms(tpot.p99)}"),
        (
            "throughput",
            f"{summary.request_throughput:,.2f} req/s, "
            f"{summary.output_token_throughput:,.0f} output tokens/s",
        ),
        (
            "cost",
            f"${summary.cost_per_million_output_tokens_usd:,.3f} per million output tokens",
        ),
    ]
    if summary.prefix_hit_ratio:
        rows.append(("prefix hit", f"{_percent(summary.prefix_hit_ratio)} of prompt tokens"))
    if summary.slo is not None:
        rows += [
            ("SLO", f"{summary.slo}: attainment {_percent(summary.slo_attainment)}"),
            *(
                [("by class", _by_class(summary.slo_attainment_by_class))]
                if summary.slo_attainment_by_class
                else []
            ),
            (
                "goodput",
                f"{_number(summary.goodput)} req/s, "
                f"{_number(summary.goodput_per_device)} per device, "
                f"{_number(summary.goodput_per_usd_hour, 4)} per $/h",
            ),
        ]
    rows.append(("shed", f"{summary.shed} ({summary.not_served} not served in all)"))
    grid = table("figure", "value")
    for row in rows:
        grid.add_row(*row)
    return render(grid)


def _by_class(attainment: dict[str, float]) -> str:
    return ", ".join(f"{name} {_percent(share)}" for name, share in sorted(attainment.items()))


PLAN_COLUMNS = ("#", "configuration", "$/h", "attainment", "TTFT p99 ms", "TPOT p99 ms", "status")


def format_plan(result: PlanResult) -> str:
    """Every configuration the search ran, in the order it ran them, under one header;
    then the recommendation."""
    grid = table(
        *PLAN_COLUMNS,
        numeric=("#", "$/h", "attainment", "TTFT p99 ms", "TPOT p99 ms"),
        title=f"{result.model}: {len(result.trials)} configurations simulated",
    )
    for number, trial in enumerate(result.trials, start=1):
        grid.add_row(*_plan_cells(number, trial))
    lines = [render(grid), ""]
    best = result.best
    if best is None:
        lines.append(
            f"no configuration tried meets {result.slo.name} at "
            f"{_percent(result.target_attainment)} attainment; raise --max-devices or --max-runs"
        )
    else:
        lines.append(
            f"recommended: {best.candidate.label()}, "
            f"${best.candidate.price_per_hour_usd:,.2f}/h, "
            f"attainment {_percent(best.attainment)} of {result.slo.name}"
        )
    if result.skipped_profiles:
        lines.append(f"(cannot hold {result.model}: {', '.join(result.skipped_profiles)})")
    return "\n".join(lines)


def format_trial(number: int, trial: PlanTrial) -> str:
    """One run of the search in a line, for its progress: "#3 2x h100 colocated: met"."""
    number_, label, price, attainment, _, _, status = _plan_cells(number, trial)
    return f"#{number_} {label} (${price}/h): {status}, attainment {attainment}"


def _plan_cells(number: int, trial: PlanTrial) -> tuple[str, ...]:
    candidate = trial.candidate
    ttft = "-" if trial.ttft_p99_s is None else _ms(trial.ttft_p99_s)
    tpot = "-" if trial.tpot_p99_s is None else _ms(trial.tpot_p99_s)
    attainment = "-" if trial.attainment is None else _percent(trial.attainment)
    return (
        str(number),
        candidate.label(),
        f"{candidate.price_per_hour_usd:,.2f}",
        attainment,
        ttft,
        tpot,
        trial.status,
    )


def write_results(
    out: Path, result: SimResult, summary: SimSummary, meta: Mapping[str, Any]
) -> list[str]:
    """Writes the summary (JSON), every request (CSV) and the plots; returns notes."""
    out.mkdir(parents=True, exist_ok=True)
    document = {**meta, "prefix_hit_ratio": summary.prefix_hit_ratio, "summary": summary.to_dict()}
    (out / RESULTS_FILE).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_requests_csv(out / REQUESTS_FILE, result)
    try:
        # Loaded only here: matplotlib is an optional extra, and nothing else needs it.
        from router.sim import plots  # noqa: PLC0415 (the import is what may fail)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.partition(".")[0] != "matplotlib":
            raise
        return [f"plots skipped: matplotlib is not installed ({PLOTS_INSTALL})"]
    plots.write_all(out, result, summary)
    return []


def write_requests_csv(path: Path, result: SimResult) -> None:
    ids = [device.id for device in result.devices]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "request",
                "arrival_s",
                "prompt_tokens",
                "output_tokens",
                "outcome",
                "mode",
                "prefill_backend",
                "decode_backend",
                "cached_tokens",
                "ttft_ms",
                "tpot_ms",
                "e2e_ms",
                "max_itl_ms",
            ]
        )
        columns = zip(
            result.arrival_s.tolist(),
            result.prompt_tokens.tolist(),
            result.output_tokens.tolist(),
            result.outcome.tolist(),
            result.split.tolist(),
            result.prefill_device.tolist(),
            result.decode_device.tolist(),
            result.cached_tokens.tolist(),
            _csv_ms(result.ttft_s),
            _csv_ms(result.tpot_s),
            _csv_ms(result.e2e_s),
            _csv_ms(result.max_itl_s),
            strict=True,
        )
        for index, row in enumerate(columns):
            arrival, prompt, output, outcome, split, prefill, decode, cached, *times = row
            routed = prefill >= 0
            writer.writerow(
                [
                    index,
                    f"{arrival:.6f}",
                    prompt,
                    output,
                    outcome,
                    ("split" if split else "colocated") if routed else "",
                    ids[prefill] if routed else "",
                    ids[decode] if decode >= 0 else "",
                    cached,
                    *times,
                ]
            )


def _csv_ms(values: np.ndarray[Any, np.dtype[np.float64]]) -> list[str]:
    return ["" if math.isnan(v) else f"{v * 1e3:.3f}" for v in values.tolist()]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:,.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"
