"""The shipped monitoring (deploy/monitoring) reads what the router exposes, and its alerts work.

promtool (Debian's ``prometheus`` package) checks the rules and runs their unit tests
(deploy/monitoring/tests); without it those two tests skip. The rest needs nothing:
every series the dashboard and the rules read is one the router's metrics module
defines, or one a rule records; the labels they filter and group by exist there.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from router.metrics import LabelledHistogram, RouterMetrics

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "rules.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: apt-get install prometheus")
    return path


def rules_file() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return document


def rules() -> list[dict[str, Any]]:
    return [rule for group in rules_file()["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((MONITORING / "hetero-router.json").read_text())
    return document


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> Iterator[str]:
    for panel in panels():
        for target in panel["targets"]:
            yield target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]


def exposed_series() -> dict[str, set[str]]:
    """Every series name the router's metrics expose, with its label names."""
    metrics = RouterMetrics(CollectorRegistry())
    series: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, LabelledHistogram):
            labels = set(metric.labelnames)
        elif isinstance(metric, MetricWrapperBase):
            labels = set(metric._labelnames)
        else:
            continue
        for family in metric.describe():
            if family.type == "counter":
                series[family.name + "_total"] = labels
            elif family.type == "histogram":
                series[family.name + "_bucket"] = labels | {"le"}
                series[family.name + "_count"] = labels
                series[family.name + "_sum"] = labels
            else:
                series[family.name] = labels
    return series


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def references(expr: str) -> tuple[set[str], set[str]]:
    """The series names a PromQL expression reads (the router's and recorded ones) and
    the label names it filters or aggregates by."""
    expr = _STRING.sub('""', expr)
    labels: set[str] = set()
    for block in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for keyword, block in _GROUPING.findall(expr):
        if keyword in ("by", "without"):
            labels |= {label.strip() for label in block.split(",") if label.strip()}
    # label_values(series, label): the second argument is a label.
    labels |= set(re.findall(r"label_values\([^,]*,\s*(\w+)\)", expr))
    bare = _GROUPING.sub("", re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr))
    bare = re.sub(r"label_values\(([^,]*),\s*\w+\)", r"\1", bare)
    names = {
        token
        for token in re.findall(r"[A-Za-z_:][\w:]*", bare)
        if token.startswith("hetero_router_") or ":" in token
    }
    return names, labels


def recorded_series() -> dict[str, set[str]]:
    """Every series the rules record, with the label names it carries."""
    known = exposed_series()
    recorded: dict[str, set[str]] = {}
    for rule in rules():
        if "record" not in rule:
            continue
        names, _ = references(rule["expr"])
        kept = [block for keyword, block in _GROUPING.findall(rule["expr"]) if keyword == "by"]
        if kept:
            labels = {label.strip() for label in kept[0].split(",")}
        else:  # histogram_quantile and arithmetic keep their input's labels, less le
            labels = set().union(*(known.get(n, recorded.get(n, set())) for n in names))
            labels -= {"le"}
        recorded.setdefault(rule["record"], set()).update(labels | set(rule.get("labels", {})))
    return recorded


def all_queries() -> Iterator[tuple[str, str]]:
    for rule in rules():
        yield rule.get("record") or rule["alert"], rule["expr"]
    for expr in dashboard_queries():
        yield "dashboard", expr


# -- promtool ----------------------------------------------------------------------


def test_promtool_checks_the_rules_file() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@pytest.mark.slow
def test_the_alert_and_recording_rule_unit_tests_pass() -> None:
    tests = sorted(str(p) for p in (MONITORING / "tests").glob("*.yml"))
    assert len(tests) >= 3
    result = subprocess.run(
        [promtool(), "test", "rules", *tests], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(tests)


# -- the files agree ---------------------------------------------------------------


def test_the_generated_files_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(MONITORING / "render.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_prometheus_rule_carries_the_rules_file_groups() -> None:
    resource = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == rules_file()["groups"]


def test_another_objective_changes_only_the_objective(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(MONITORING / "render.py"),
            "--objective",
            "0.995",
            "--out",
            str(tmp_path),
        ],
        check=True,
    )
    groups = yaml.safe_load((tmp_path / "rules.yml").read_text())["groups"]
    changed = [
        (mine, theirs)
        for group, shipped in zip(groups, rules_file()["groups"], strict=True)
        for mine, theirs in zip(group["rules"], shipped["rules"], strict=True)
        if mine != theirs
    ]
    assert changed == [
        (
            {"record": "hetero_router:slo_objective:ratio", "expr": "vector(0.995)"},
            {"record": "hetero_router:slo_objective:ratio", "expr": "vector(0.99)"},
        )
    ]


# -- names -------------------------------------------------------------------------


def test_every_series_read_is_exposed_by_the_router_or_recorded() -> None:
    exposed, recorded = exposed_series(), recorded_series()
    unknown = {
        (where, name)
        for where, expr in all_queries()
        for name in references(expr)[0]
        if name not in exposed and name not in recorded
    }
    assert not unknown


def test_every_label_filtered_or_grouped_by_is_on_a_series_read() -> None:
    carried = exposed_series() | recorded_series()
    missing = set()
    for where, expr in all_queries():
        names, labels = references(expr)
        available = set().union(*(carried.get(name, set()) for name in names))
        missing |= {(where, label) for label in labels - available}
    assert not missing


def test_the_reference_parser_finds_names_and_labels() -> None:
    names, labels = references(
        'sum by (model, le) (rate(hetero_router_x_bucket{mode=~"$mode", a!="b{c}"}[5m]))'
        " / on () group_left () level:hetero_router_y:rate5m"
    )
    assert names == {"hetero_router_x_bucket", "level:hetero_router_y:rate5m"}
    assert labels == {"model", "le", "mode", "a"}


def test_the_dashboard_reads_recorded_series_where_a_rule_records_them() -> None:
    read_by_rules = {
        name for rule in rules() if "record" in rule for name in references(rule["expr"])[0]
    }
    raw = {
        name
        for expr in dashboard_queries()
        if not expr.startswith("label_values(")
        for name in references(expr)[0]
    }
    assert not raw & read_by_rules


# -- rules -------------------------------------------------------------------------


def test_the_burn_rate_alerts_follow_the_workbook_table() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    table = {"1h": (14.4, "5m", "page"), "6h": (6, "30m", "page"), "3d": (1, "6h", "ticket")}
    for quantity in ("TTFT", "TPOT"):
        for long_window, (burn_rate, short_window, severity) in table.items():
            alert = alerts.pop(f"HeteroRouter{quantity}BudgetBurn{long_window}")
            counter = f"hetero_router_slo_{quantity.lower()}_requests"
            windows = re.findall(rf"{counter}:attainment_rate(\w+)\)", alert["expr"])
            assert windows == [long_window, short_window]
            assert (
                alert["expr"].count(f"({burn_rate:g} * (1 - hetero_router:slo_objective:ratio))")
                == 2
            )
            assert alert["labels"] == {"severity": severity, "slo": quantity.lower()}
            assert {"summary", "description"} <= set(alert["annotations"])
    assert not alerts


def test_every_alert_is_explained_in_the_readme() -> None:
    readme = (MONITORING / "README.md").read_text()
    for rule in rules():
        if "alert" in rule:
            assert f"`{rule['alert']}`" in readme, rule["alert"]


# -- dashboard ---------------------------------------------------------------------


def test_the_dashboard_asks_for_a_prometheus_data_source_and_filters_by_model_and_mode() -> None:
    document = dashboard()
    assert document["schemaVersion"] >= 39
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "mode"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"]["query"].startswith("label_values(")
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["fieldConfig"]["defaults"]["unit"] in {
            "s",
            "reqps",
            "percentunit",
            "Bps",
            "short",
            "none",
        }
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_the_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    document = dashboard()
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_the_dashboard_shows_what_an_slo_owner_looks_for() -> None:
    read = " ".join(dashboard_queries())
    for series in (
        "time_to_first_token_seconds:quantile",
        "inter_token_latency_seconds:quantile",
        "request_time_per_output_token_seconds:quantile",
        "model_mode_kinds:",
        "goodput",
        "slo_ttft_requests:attainment",
        "slo_tpot_requests:attainment",
        "shed",
        "kv_handoff_seconds",
        "kv_handoff_bytes",
        "backend_outstanding_requests",
        "backend_kv_cache_usage_perc",
        "backend_request_latency_seconds",
        "requests:rate5m",
        "request_queue_time_seconds",
    ):
        assert series in read, series
