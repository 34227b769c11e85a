"""Write the shipped monitoring files of deploy/monitoring (and check that they are current).

    python deploy/monitoring/render.py            # rewrite the rules, PrometheusRule, dashboard
    python deploy/monitoring/render.py --check    # exit 1 when a file differs
    python deploy/monitoring/render.py --objective 0.995 --out DIR    # another SLO objective

One definition of every rule gives both rule files: ``rules.yml`` (Prometheus
``rule_files``) and ``prometheusrule.yaml`` (the Prometheus Operator's PrometheusRule,
the same groups under ``spec``), so the two never drift. The dashboard reads the
recorded series wherever a rule records one.

Recording rules are named ``level:metric:operation`` (Prometheus' convention): the
level lists the labels kept, ``kinds`` standing for ``prefill_kind, decode_kind``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES_FILE = "rules.yml"
PROMETHEUS_RULE_FILE = "prometheusrule.yaml"
DASHBOARD_FILE = "hetero-router.json"

DEFAULT_OBJECTIVE = 0.99
QUANTILES = ("0.5", "0.9", "0.99")
# The windows the burn-rate alerts read, and the dashboard's 5m.
SLO_WINDOWS = ("5m", "30m", "1h", "6h", "3d")
OBJECTIVE_SERIES = "hetero_router:slo_objective:ratio"
# Grafana 12's dashboard schema; newer releases migrate it on import.
GRAFANA_SCHEMA_VERSION = 41

P = "hetero_router_"


@dataclass(frozen=True)
class Histogram:
    metric: str  # without the prefix
    levels: tuple[tuple[str, tuple[str, ...]], ...]  # (level name, labels kept)


MODE = ("model_mode", ("model", "mode"))
MODE_KINDS = ("model_mode_kinds", ("model", "mode", "prefill_kind", "decode_kind"))
KINDS = ("model_kinds", ("model", "prefill_kind", "decode_kind"))
BACKEND_PHASE = ("backend_phase", ("backend", "phase"))

HISTOGRAMS = (
    Histogram("time_to_first_token_seconds", (MODE, MODE_KINDS)),
    Histogram("inter_token_latency_seconds", (MODE, MODE_KINDS)),
    Histogram("request_time_per_output_token_seconds", (MODE, MODE_KINDS)),
    Histogram("e2e_request_latency_seconds", (MODE, MODE_KINDS)),
    Histogram("request_queue_time_seconds", (MODE,)),
    Histogram("request_prefill_time_seconds", (MODE,)),
    Histogram("request_decode_time_seconds", (MODE,)),
    Histogram("kv_handoff_seconds", (KINDS,)),
    Histogram("backend_request_latency_seconds", (BACKEND_PHASE,)),
)

# (level, labels kept, counter without prefix and _total)
COUNTER_RATES = (
    ("model_mode_outcome", ("model", "mode", "outcome"), "requests"),
    ("reason", ("reason",), "shed"),
    ("model_kinds", KINDS[1], "kv_handoff_bytes"),
    ("model_mode", MODE[1], "prompt_tokens"),
    ("model_mode", MODE[1], "generation_tokens"),
)

# The SLO counters: met when the request met that target (slo_requests: both).
SLO_COUNTERS = ("slo_requests", "slo_ttft_requests", "slo_tpot_requests")


@dataclass(frozen=True)
class Burn:
    """One row of the SRE workbook's multiwindow, multi-burn-rate table."""

    budget: str  # share of a 30-day error budget spent when the alert fires
    burn_rate: float
    long_window: str
    short_window: str
    severity: str


BURNS = (
    Burn("2%", 14.4, "1h", "5m", "page"),
    Burn("5%", 6.0, "6h", "30m", "page"),
    Burn("10%", 1.0, "3d", "6h", "ticket"),
)
# (label value, alert name part, what the target is)
SLO_QUANTITIES = (
    ("ttft", "TTFT", "time to first token"),
    ("tpot", "TPOT", "time per output token"),
)


def bucket_rate(histogram: str, level: str) -> str:
    return f"{level}:{P}{histogram}_bucket:rate5m"


def quantile_series(histogram: str, level: str) -> str:
    return f"{level}:{P}{histogram}:quantile_rate5m"


def attainment_series(counter: str, window: str) -> str:
    return f"model_slo_class:{P}{counter}:attainment_rate{window}"


def by(labels: tuple[str, ...]) -> str:
    return ", ".join(labels)


# -- rules -------------------------------------------------------------------------


def latency_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for histogram in HISTOGRAMS:
        for level, labels in histogram.levels:
            rules.append(
                {
                    "record": bucket_rate(histogram.metric, level),
                    "expr": f"sum by ({by(labels)}, le) (rate({P}{histogram.metric}_bucket[5m]))",
                }
            )
            rules += [
                {
                    "record": quantile_series(histogram.metric, level),
                    "expr": f"histogram_quantile({q}, {bucket_rate(histogram.metric, level)})",
                    "labels": {"quantile": q},
                }
                for q in QUANTILES
            ]
    return rules


def rate_rules() -> list[dict[str, Any]]:
    return [
        {
            "record": f"{level}:{P}{counter}:rate5m",
            "expr": f"sum by ({by(labels)}) (rate({P}{counter}_total[5m]))",
        }
        for level, labels, counter in COUNTER_RATES
    ]


def slo_rules(objective: float) -> list[dict[str, Any]]:
    slo_labels = ("model", "mode", "slo_class")
    rules: list[dict[str, Any]] = [
        # The objective every class is held to; the alerts read their budget from it.
        {"record": OBJECTIVE_SERIES, "expr": f"vector({objective})"},
        {
            "record": f"model_mode_slo_class:{P}goodput:rate5m",
            "expr": f'sum by ({by(slo_labels)}) (rate({P}slo_requests_total{{outcome="met"}}[5m]))',
        },
        {
            "record": f"model_mode_slo_class:{P}slo_requests:rate5m",
            "expr": f"sum by ({by(slo_labels)}) (rate({P}slo_requests_total[5m]))",
        },
    ]
    for counter in SLO_COUNTERS:
        for window in SLO_WINDOWS:
            met = f'sum by (model, slo_class) (rate({P}{counter}_total{{outcome="met"}}[{window}]))'
            total = f"sum by (model, slo_class) (rate({P}{counter}_total[{window}]))"
            rules.append(
                {"record": attainment_series(counter, window), "expr": f"{met}\n/\n{total}\n"}
            )
    return rules


def burn_condition(counter: str, window: str, burn_rate: float) -> str:
    return (
        f"(1 - {attainment_series(counter, window)})\n"
        f"  > on () group_left () ({burn_rate:g} * (1 - {OBJECTIVE_SERIES}))"
    )


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for quantity, name, target in SLO_QUANTITIES:
        counter = f"slo_{quantity}_requests"
        for burn in BURNS:
            rules.append(
                {
                    "alert": f"HeteroRouter{name}BudgetBurn{burn.long_window}",
                    "expr": (
                        f"{burn_condition(counter, burn.long_window, burn.burn_rate)}\n"
                        "and\n"
                        f"{burn_condition(counter, burn.short_window, burn.burn_rate)}\n"
                    ),
                    "labels": {"severity": burn.severity, "slo": quantity},
                    "annotations": {
                        "summary": (
                            f"{name} error budget of {{{{ $labels.model }}}} / "
                            f"{{{{ $labels.slo_class }}}} burning over {burn.burn_rate:g}x "
                            f"({burn.long_window})"
                        ),
                        "description": (
                            f"{{{{ $value | humanizePercentage }}}} of the requests of model "
                            f"{{{{ $labels.model }}}}, SLO class {{{{ $labels.slo_class }}}} "
                            f"missed their {target} target over the last {burn.long_window}, "
                            f"and over {burn.burn_rate:g}x the budget's share over the last "
                            f"{burn.short_window} too: over {burn.budget} of a 30-day error "
                            f"budget spent in {burn.long_window}. Runbook: "
                            f'deploy/monitoring/README.md, "{name} budget burn".'
                        ),
                    },
                }
            )
    return rules


def rule_groups(objective: float) -> list[dict[str, Any]]:
    return [
        {"name": "hetero-router.latency", "rules": latency_rules()},
        {"name": "hetero-router.rates", "rules": rate_rules()},
        # The alerts follow the attainment they read in the same group: a group's rules
        # run in order, so each evaluation alerts on the attainment it just recorded.
        {"name": "hetero-router.slo", "rules": slo_rules(objective) + alert_rules()},
    ]


def prometheus_rule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "hetero-router",
            "labels": {"app.kubernetes.io/name": "hetero-router"},
        },
        "spec": {"groups": groups},
    }


# -- dashboard ---------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROUTE = 'model=~"$model", mode=~"$mode"'
MODEL = 'model=~"$model"'
CLASS = 'model=~"$model", slo_class=~"$slo_class"'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    width: int = 8
    max_value: float | None = None
    thresholds: tuple[float, ...] = ()


def percentiles(series: str, selector: str, legend: str) -> tuple[Target, ...]:
    return tuple(
        Target(f'{series}{{{selector}, quantile="{q}"}}', f"p{float(q) * 100:g} {legend}")
        for q in reversed(QUANTILES)
    )


def latency_by_mode(histogram: str, what: str) -> Panel:
    return Panel(
        f"{what} by mode",
        f"p50 / p90 / p99 of {what.lower()} ({P}{histogram}), per model and mode, over 5m.",
        "s",
        percentiles(quantile_series(histogram, MODE[0]), ROUTE, "{{model}} {{mode}}"),
    )


def latency_by_kinds(histogram: str, what: str) -> Panel:
    return Panel(
        f"{what} by device kind",
        f"p50 / p90 / p99 of {what.lower()} per route's prefill -> decode device kinds "
        "(a colocated route names its one backend's kind twice), over 5m.",
        "s",
        percentiles(
            quantile_series(histogram, MODE_KINDS[0]),
            ROUTE,
            "{{prefill_kind}} -> {{decode_kind}} ({{mode}})",
        ),
    )


def burn_panel(quantity: str, name: str) -> Panel:
    counter = f"slo_{quantity}_requests"
    return Panel(
        f"{name} error budget burn rate (1h)",
        f"How fast each class spends its {name} error budget: the share of requests that "
        f"missed their {name} target over the last hour, over the budget (1 - "
        f"{OBJECTIVE_SERIES}). 1 spends it in 30 days; the page alerts fire above 14.4 "
        "(1h) and 6 (6h).",
        "none",
        (
            Target(
                f"(1 - {attainment_series(counter, '1h')}{{{CLASS}}})\n"
                f"  / on () group_left () (1 - {OBJECTIVE_SERIES})",
                "{{model}} {{slo_class}}",
            ),
        ),
        thresholds=(6.0, 14.4),
    )


def attainment_panel(counter: str, name: str) -> Panel:
    return Panel(
        f"{name} attainment per SLO class",
        f"Share of completed requests held to an SLO that met their {name} target, over 5m "
        f"and 1h, with the objective ({OBJECTIVE_SERIES}).",
        "percentunit",
        (
            Target(f"{attainment_series(counter, '5m')}{{{CLASS}}}", "{{model}} {{slo_class}} 5m"),
            Target(f"{attainment_series(counter, '1h')}{{{CLASS}}}", "{{model}} {{slo_class}} 1h"),
            Target(OBJECTIVE_SERIES, "objective"),
        ),
        max_value=1.0,
    )


def rows() -> list[tuple[str, list[Panel]]]:
    ttft, itl, tpot = (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "request_time_per_output_token_seconds",
    )
    return [
        (
            "SLO",
            [
                Panel(
                    "Goodput per SLO class",
                    "Requests per second that met their SLO (both TTFT and TPOT).",
                    "reqps",
                    (
                        Target(
                            f"sum by (model, slo_class) (model_mode_slo_class:{P}goodput:rate5m"
                            f'{{{ROUTE}, slo_class=~"$slo_class"}})',
                            "{{model}} {{slo_class}}",
                        ),
                    ),
                ),
                Panel(
                    "SLO attainment per class",
                    "Share of completed requests held to an SLO that met both targets (TTFT "
                    "and TPOT), over 5m, for the modes selected above.",
                    "percentunit",
                    (
                        Target(
                            f"sum by (model, slo_class) (model_mode_slo_class:{P}goodput:rate5m"
                            f'{{{ROUTE}, slo_class=~"$slo_class"}})\n/\n'
                            f"sum by (model, slo_class) (model_mode_slo_class:{P}slo_requests:"
                            f'rate5m{{{ROUTE}, slo_class=~"$slo_class"}})',
                            "{{model}} {{slo_class}}",
                        ),
                        Target(OBJECTIVE_SERIES, "objective"),
                    ),
                    max_value=1.0,
                ),
                attainment_panel("slo_ttft_requests", "TTFT"),
                attainment_panel("slo_tpot_requests", "TPOT"),
                Panel(
                    "Shed by reason",
                    "Requests refused RESOURCE_EXHAUSTED (HTTP 429) by the router, per reason.",
                    "reqps",
                    (Target(f"reason:{P}shed:rate5m", "{{reason}}"),),
                ),
                burn_panel("ttft", "TTFT"),
                burn_panel("tpot", "TPOT"),
                Panel(
                    "Requests by outcome",
                    "Finished generate requests per second by outcome (mode none: refused "
                    "before a route was chosen).",
                    "reqps",
                    (
                        Target(
                            f"sum by (outcome) (model_mode_outcome:{P}requests:rate5m{{{MODEL}}})",
                            "{{outcome}}",
                        ),
                    ),
                    width=16,
                ),
            ],
        ),
        (
            "Latency by mode",
            [
                latency_by_mode(ttft, "Time to first token"),
                latency_by_mode(itl, "Inter-token latency"),
                latency_by_mode(tpot, "Time per output token"),
                latency_by_mode("e2e_request_latency_seconds", "End-to-end latency"),
                latency_by_mode("request_queue_time_seconds", "Queue time"),
                Panel(
                    "Prefill and decode time p99",
                    "p99 of the request's prefill (admission to prefill done) and decode "
                    "(first token to last) phases.",
                    "s",
                    (
                        Target(
                            quantile_series("request_prefill_time_seconds", MODE[0])
                            + f'{{{ROUTE}, quantile="0.99"}}',
                            "prefill {{model}} {{mode}}",
                        ),
                        Target(
                            quantile_series("request_decode_time_seconds", MODE[0])
                            + f'{{{ROUTE}, quantile="0.99"}}',
                            "decode {{model}} {{mode}}",
                        ),
                    ),
                ),
            ],
        ),
        (
            "Latency by device kind",
            [
                latency_by_kinds(ttft, "Time to first token"),
                latency_by_kinds(itl, "Inter-token latency"),
                latency_by_kinds(tpot, "Time per output token"),
            ],
        ),
        (
            "Throughput and KV handoff",
            [
                Panel(
                    "Tokens per second",
                    "Prompt tokens (as the backends counted them) and tokens streamed to "
                    "clients, per second, of completed requests.",
                    "short",
                    (
                        Target(
                            f"model_mode:{P}prompt_tokens:rate5m{{{ROUTE}}}",
                            "prompt {{model}} {{mode}}",
                        ),
                        Target(
                            f"model_mode:{P}generation_tokens:rate5m{{{ROUTE}}}",
                            "generation {{model}} {{mode}}",
                        ),
                    ),
                ),
                Panel(
                    "KV handoff time",
                    "Split requests: prefill backend's answer to the decode backend's first "
                    "token (KV transfer and the first decode step), p50 and p99.",
                    "s",
                    tuple(
                        t
                        for t in percentiles(
                            quantile_series("kv_handoff_seconds", KINDS[0]),
                            MODEL,
                            "{{prefill_kind}} -> {{decode_kind}}",
                        )
                        if not t.legend.startswith("p90")
                    ),
                ),
                Panel(
                    "KV handoff bytes per second",
                    "KV bytes handed from prefill to decode backends, per second.",
                    "Bps",
                    (
                        Target(
                            f"model_kinds:{P}kv_handoff_bytes:rate5m{{{MODEL}}}",
                            "{{prefill_kind}} -> {{decode_kind}}",
                        ),
                    ),
                ),
            ],
        ),
        (
            "Backends",
            [
                Panel(
                    "Outstanding requests per backend",
                    "Requests the router has in flight on each backend.",
                    "short",
                    (Target(f"sum by (backend) ({P}backend_outstanding_requests)", "{{backend}}"),),
                ),
                Panel(
                    "KV cache usage per backend",
                    "KV cache in use (0..1), from each backend's load report.",
                    "percentunit",
                    (
                        Target(
                            f"max by (backend, kind) ({P}backend_kv_cache_usage_perc)",
                            "{{backend}} ({{kind}})",
                        ),
                    ),
                    max_value=1.0,
                ),
                Panel(
                    "Backend leg latency p99",
                    "p99 of one leg's duration on each backend, by phase (prefill, decode, "
                    "generate); backends past the first 64 are 'other'.",
                    "s",
                    (
                        Target(
                            quantile_series("backend_request_latency_seconds", BACKEND_PHASE[0])
                            + '{quantile="0.99"}',
                            "{{backend}} {{phase}}",
                        ),
                    ),
                ),
                Panel(
                    "Running and waiting",
                    "Requests admitted and being served, and waiting in the admission queue.",
                    "short",
                    (
                        Target(
                            f"sum by (model) ({P}num_requests_running{{{MODEL}}})",
                            "running {{model}}",
                        ),
                        Target(
                            f"sum by (model) ({P}num_requests_waiting{{{MODEL}}})",
                            "waiting {{model}}",
                        ),
                    ),
                ),
                Panel(
                    "Retries and backend failures",
                    "Attempts after a failed one, by kind, and failed legs by backend and phase.",
                    "reqps",
                    (
                        Target(
                            f"sum by (kind) (rate({P}retries_total[$__rate_interval]))", "{{kind}}"
                        ),
                        Target(
                            f"sum by (backend, phase) "
                            f"(rate({P}backend_failures_total[$__rate_interval]))",
                            "failed {{backend}} {{phase}}",
                        ),
                    ),
                ),
                Panel(
                    "Backend health",
                    "1 while a backend passes its health checks (by role); ejected: 1 while "
                    "passive outlier detection holds it out.",
                    "short",
                    (
                        Target(
                            f"max by (backend, role) ({P}backend_healthy)",
                            "healthy {{backend}} {{role}}",
                        ),
                        Target(f"max by (backend) ({P}backend_ejected)", "ejected {{backend}}"),
                    ),
                ),
            ],
        ),
    ]


def timeseries(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "min": 0,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never"},
    }
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
    if panel.thresholds:
        defaults["custom"]["thresholdsStyle"] = {"mode": "dashed"}
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}]
            + [
                {"color": color, "value": value}
                for color, value in zip(("orange", "red"), panel.thresholds, strict=False)
            ],
        }
    return {
        "type": "timeseries",
        "id": panel_id,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend,
                "range": True,
                "refId": chr(ord("A") + index),
            }
            for index, target in enumerate(panel.targets)
        ],
    }


def layout() -> Iterator[dict[str, Any]]:
    panel_id, y = 1, 0
    for title, panels in rows():
        yield {
            "type": "row",
            "id": panel_id,
            "title": title,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "panels": [],
        }
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            yield timeseries(panel, panel_id, x, y)
            panel_id, x = panel_id + 1, x + panel.width
        y += 8


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "regex": "",
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "hetero-router",
        "title": "hetero-router",
        "description": "SLOs, latency by mode and device kind, KV handoff and backend load "
        "of hetero-router (recording rules of deploy/monitoring/rules.yml).",
        "tags": ["hetero-router", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "id": None,
        "links": [],
        "refresh": "30s",
        "schemaVersion": GRAFANA_SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {},
                    "refresh": 1,
                    "hide": 0,
                    "regex": "",
                },
                query_variable("model", "Model", f"label_values({P}requests_total, model)"),
                query_variable(
                    "mode",
                    "Mode",
                    # A counter of every route from the start (histograms: from first use).
                    f"label_values({P}slo_requests_total{{{MODEL}}}, mode)",
                ),
                query_variable(
                    "slo_class",
                    "SLO class",
                    f"label_values({P}slo_requests_total{{{MODEL}}}, slo_class)",
                ),
            ]
        },
        "panels": list(layout()),
    }


# -- files -------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so PromQL reads as it is written."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(document: dict[str, Any], header: str) -> str:
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return header + body


def header(objective: float) -> str:
    return (
        "# Generated by `make monitoring` (deploy/monitoring/render.py). Do not edit: change\n"
        "# the generator, or pass --objective for another SLO objective\n"
        f"# (here {objective:g}, the rule {OBJECTIVE_SERIES}).\n"
    )


def files(objective: float) -> dict[str, str]:
    groups = rule_groups(objective)
    return {
        RULES_FILE: to_yaml({"groups": groups}, header(objective)),
        PROMETHEUS_RULE_FILE: to_yaml(prometheus_rule(groups), header(objective)),
        DASHBOARD_FILE: json.dumps(dashboard(), indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is not current")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: here)")
    parser.add_argument(
        "--objective",
        type=float,
        default=DEFAULT_OBJECTIVE,
        help=f"share of requests that must meet their SLO (default {DEFAULT_OBJECTIVE})",
    )
    args = parser.parse_args(argv)
    if not 0 < args.objective < 1:
        parser.error("--objective must lie strictly between 0 and 1")
    stale = []
    for name, text in files(args.objective).items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"not current: {', '.join(stale)}; run `make monitoring`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
