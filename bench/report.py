"""Results on disk: one JSON per scenario, its plot, and a summary line in SUMMARY.md."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from router.console import render, table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def write_result(name: str, result: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_summary(out_dir)
    return path


def write_summary(out_dir: Path = RESULTS_DIR) -> Path:
    """SUMMARY.md is rebuilt from every result present, so it always matches them."""
    lines = [
        "# Benchmark summary",
        "",
        "Made by `make bench` (full) or `make bench-quick`; each line links its JSON and plot.",
        "",
        "| scenario | mode | figures | targets met |",
        "| --- | --- | --- | --- |",
    ]
    for path in sorted(out_dir.glob("*.json")):
        result = json.loads(path.read_text())
        if "headline" not in result:  # not a scenario's result (the frontier's sweeps)
            continue
        checks = result.get("targets", {})
        met = sum(1 for check in checks.values() if check.get("met"))
        headline = ", ".join(f"{k} {_fmt(v)}" for k, v in result.get("headline", {}).items())
        plot = f" ([plot]({path.stem}.png))" if (out_dir / f"{path.stem}.png").exists() else ""
        lines.append(
            f"| [{path.stem}]({path.name}){plot} | {result.get('mode', '')} | {headline} | "
            f"{met}/{len(checks)} |"
        )
    summary = out_dir / "SUMMARY.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary


def check(
    value: float, *, at_most: float | None = None, at_least: float | None = None
) -> dict[str, Any]:
    met = (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
    target = f"<= {at_most}" if at_most is not None else f">= {at_least}"
    return {"value": round(value, 4), "target": target, "met": bool(met)}


def targets_table(targets: dict[str, dict[str, Any]]) -> str:
    """A scenario's targets as a table: each figure, its value, the target, whether met."""
    grid = table("figure", "value", "target", "met", numeric=("value",))
    for name, judged in targets.items():
        value = judged.get("value")
        grid.add_row(
            name,
            "-" if value is None else _fmt(value),
            str(judged.get("target", "")),
            "yes" if judged.get("met") else "NO",
        )
    return render(grid) if targets else "(no targets)"


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
