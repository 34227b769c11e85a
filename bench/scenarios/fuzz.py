"""Scenario `fuzz`: each coverage-guided fuzz target of bench/fuzz for a number of inputs.

Each target runs in a subprocess of its own (``python -m bench.fuzz.runner``, since
``atheris.Fuzz()`` never returns) with libFuzzer's ``-runs``, a fixed seed, its seed
corpus (``bench/fuzz/corpus/<target>/``, read only: new inputs go to a scratch folder)
and a time limit. Reported per target: inputs run, crashes (inputs whose one-input
function raised something other than its expected refusals) and their kinds, coverage
(libFuzzer's edges ``cov`` and features ``ft``), seconds and inputs per second. The
first input of each kind of crash is written to ``bench/results/fuzz-crashes/<target>-<hash>``;
so are libFuzzer's own finds (an input over the per-input timeout, out of memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fuzz import CORPUS_DIR, INSTALL_HINT, TARGETS
from bench.fuzz.config_files import SCRATCH_ENV
from bench.report import check, machine, write_result

FULL_RUNS, QUICK_RUNS = 100_000, 2_000
# Wall-clock bounds of one target (libFuzzer's own, then the subprocess's, a minute later):
# the file targets parse YAML in instrumented Python, a few hundred inputs a second at best,
# and stop here short of their runs (the report says how many they ran).
FULL_SECONDS, QUICK_SECONDS = 300, 120
# An input that runs longer than this is a hang, and libFuzzer reports it.
INPUT_TIMEOUT_S = 30
MAX_INPUT_BYTES = 8192
RSS_LIMIT_MB = 2048

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
_PULSE = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.MULTILINE)


def parse_libfuzzer(output: str) -> dict[str, int]:
    """Figures from libFuzzer's stderr: its final stats (``-print_final_stats``) and the
    coverage of its last status line."""
    figures = {name: int(value) for name, value in _STAT.findall(output)}
    pulses = _PULSE.findall(output)
    if pulses:
        runs, edges, features = (int(value) for value in pulses[-1])
        figures.setdefault("number_of_executed_units", runs)
        figures["coverage_edges"], figures["coverage_features"] = edges, features
    return figures


async def fuzz_target(
    name: str, runs: int, max_seconds: int, crash_dir: Path, scratch: Path
) -> dict[str, Any]:
    """Runs one target; its figures, and ``error`` when the run did not end as planned."""
    work = scratch / name
    work.mkdir()
    report = scratch / f"{name}.json"
    before = _crash_files(crash_dir, name)
    command = [
        sys.executable,
        "-m",
        "bench.fuzz.runner",
        name,
        str(report),
        str(crash_dir),
        f"-runs={runs}",
        f"-max_total_time={max_seconds}",
        f"-timeout={INPUT_TIMEOUT_S}",
        f"-max_len={MAX_INPUT_BYTES}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={crash_dir}/{name}-",
        "-seed=1",
        "-print_final_stats=1",
        "-close_fd_mask=1",  # a target's own stdout would drown the stats
        str(work),  # where libFuzzer adds what it finds: not the seed corpus
        str(CORPUS_DIR / name),
    ]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, SCRATCH_ENV: str(scratch)},
    )
    error = None
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), max_seconds + 60)
    except TimeoutError:
        process.kill()
        _, stderr = await process.communicate()
        error = f"killed after {max_seconds + 60} s"
    seconds = time.monotonic() - started
    output = stderr.decode("utf-8", errors="replace")
    if error is None and process.returncode != 0:
        error = f"exit {process.returncode}: {output.strip().splitlines()[-1:]}"
    artifacts = sorted(str(path) for path in _crash_files(crash_dir, name) - before)
    result = _figures(output, report, artifacts, seconds)
    if error is not None:
        result["error"] = error
    return result


def _crash_files(crash_dir: Path, name: str) -> set[Path]:
    return set(crash_dir.glob(f"{name}-*"))


def _figures(output: str, report: Path, artifacts: list[str], seconds: float) -> dict[str, Any]:
    """One target's figures from libFuzzer's output and the runner's report."""
    found = json.loads(report.read_text()) if report.exists() else {}
    figures = parse_libfuzzer(output)
    kinds = found.get("kinds", [])
    inputs = figures.get("number_of_executed_units", found.get("runs", 0))
    return {
        "inputs": inputs,
        "crashes": found.get("crashes", 0) + len(_libfuzzer_artifacts(artifacts, kinds)),
        "crash_kinds": kinds,
        "crash_files": [path for path in artifacts if not _is_slow_input(path)],
        # Inputs over libFuzzer's -report_slow_units (10 s): no crash, worth a look.
        "slow_inputs": [path for path in artifacts if _is_slow_input(path)],
        "coverage_edges": figures.get("coverage_edges", 0),
        "coverage_features": figures.get("coverage_features", 0),
        "corpus_units_added": figures.get("new_units_added", 0),
        "seconds": round(seconds, 1),
        # libFuzzer's own rate leaves out the start (imports under instrumentation).
        "inputs_per_s": figures.get("average_exec_per_sec", 0),
        "peak_rss_mb": figures.get("peak_rss_mb", 0),
    }


def _libfuzzer_artifacts(artifacts: list[str], kinds: list[dict[str, Any]]) -> list[str]:
    """Crashes libFuzzer found itself (an input over the per-input timeout, out of
    memory), not the runner's, and not the slow inputs it also writes down."""
    ours = {kind["input"] for kind in kinds}
    return [path for path in artifacts if path not in ours and not _is_slow_input(path)]


def _is_slow_input(path: str) -> bool:
    return "-slow-unit-" in Path(path).name


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    if importlib.util.find_spec("atheris") is None:
        raise SystemExit(f"scenario fuzz: {INSTALL_HINT}")
    runs = QUICK_RUNS if quick else FULL_RUNS
    max_seconds = QUICK_SECONDS if quick else FULL_SECONDS
    crash_dir = out_dir / "fuzz-crashes"
    crash_dir.mkdir(parents=True, exist_ok=True)
    targets: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hetero-router-fuzz-") as scratch:
        for name in TARGETS:
            print(f"  {name}: {runs} inputs", file=sys.stderr, flush=True)
            targets[name] = await fuzz_target(name, runs, max_seconds, crash_dir, Path(scratch))
    with contextlib.suppress(OSError):
        crash_dir.rmdir()  # only when nothing crashed
    inputs = sum(figures["inputs"] for figures in targets.values())
    crashes = sum(figures["crashes"] for figures in targets.values())
    checks: dict[str, Any] = {}
    for name, figures in targets.items():
        checks[f"{name}_crashes"] = check(figures["crashes"], at_most=0)
        checks[f"{name}_inputs"] = check(figures["inputs"], at_least=runs)
    result: dict[str, Any] = {
        "scenario": "fuzz",
        "mode": "quick" if quick else "full",
        "runs_per_target": runs,
        "figures": targets,
        "targets": checks,
        "headline": {
            "inputs": inputs,
            "crashes": crashes,
            "crash kinds": sum(len(f["crash_kinds"]) for f in targets.values()),
        },
        "machine": machine(),
    }
    write_result("fuzz", result, out_dir)
    return result
