"""python -m bench [--quick] [--scenario NAME ...]: run scenarios, write bench/results/."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from bench import auto_split
from bench.report import RESULTS_DIR, targets_table
from bench.scenarios import (
    chaos,
    engines,
    fuzz,
    http_pd,
    kv,
    observability,
    overhead,
    overload,
    peers,
    scheduling,
)

SCENARIOS: dict[str, Callable[[bool, Path], Coroutine[Any, Any, dict[str, Any]]]] = {
    "overhead": overhead.run,
    "http_pd": http_pd.run,
    "kv": kv.run,
    "scheduling": scheduling.run,
    "auto_split": auto_split.scenario,
    "engines": engines.run,
    "chaos": chaos.run,
    "overload": overload.run,
    "fuzz": fuzz.run,
    "observability": observability.run,
    "peers": peers.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (make bench-quick)")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    for name in options.scenario or sorted(SCENARIOS):
        started = time.monotonic()
        print(f"scenario {name} ({'quick' if options.quick else 'full'})", file=sys.stderr)
        result: dict[str, Any] = uvloop.run(SCENARIOS[name](options.quick, options.out))
        print(targets_table(result.get("targets", {})), file=sys.stderr)
        print(f"scenario {name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(f"summary: {options.out / 'SUMMARY.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
