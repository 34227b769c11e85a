"""python -m bench.frontier: the cost frontier of Llama-3.1-70B on two workloads.

For each workload, ``router.sim.frontier`` (what ``hetero-router plan --frontier``
runs) sweeps the TPOT target from 2 to 100 ms and finds the cheapest fleet of each
type in the catalogue (colocated GPUs, GPU prefill + GPU decode, GPU prefill + SRAM
decode, colocated SRAM parts) at 90% attainment; the results go to
``bench/results/frontier-<workload>.json`` and ``.png``. Every figure is modelled
(backends/perf/profiles.yaml), none is measured on hardware.

- ``chatbot``: the built-in chatbot workload (ShareGPT-like lengths, mean prompt 755
  and output 200 tokens, no shared prefixes) at 100 requests/s, TTFT 1 s.
- ``mooncake-like``: the lengths and prefix reuse of Mooncake's Tool & Agent trace
  (see ``MOONCAKE_SOURCE``) at 25 requests/s, TTFT 10 s; every device caches prefixes
  in half of its KV memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import RESULTS_DIR
from router.sim.frontier import FleetType, FrontierPoint, FrontierResult, sweep_frontier
from router.sim.frontier_report import format_frontier, write_frontier
from router.sim.planner import PlanTrial
from router.sim.policy import resolve_policy
from router.sim.workload import LengthDistribution, PrefixSharing, generate_for_duration

MODEL = "llama-3.1-70b"
WINDOW_S = 60.0  # of Poisson arrivals per simulation, as `plan` simulates by default
MAX_DEVICES = 32
ATTAINMENT = 0.9
SEED = 0

MOONCAKE_SOURCE = (
    "Mooncake FAST'25 paper (Qin et al., 'Mooncake: Trading More Storage for Less "
    "Computation', USENIX FAST'25), Table 2 and FAST25-release/README.md of "
    "github.com/kvcache-ai/Mooncake: the Tool & Agent trace, 23,608 requests sampled "
    "over one hour, average input 8,596 tokens, average output 182 tokens, prefix cache "
    "ratio 59% ('pre-designed, often lengthy, system prompts that are fully repetitive'). "
    "TTFT 10 s is the threshold of the paper's P/D-ratio experiment (section 5.5)"
)
# 90% of requests open with one of 32 system prompts of 5,632 tokens (88 blocks of 64):
# 0.9 * 5,632 / 8,596 = 59% of prompt tokens shareable, the trace's cache ratio. The
# share, the number of prompts and the spreads are this project's choice.
MOONCAKE_PREFIX = PrefixSharing(fraction=0.9, groups=32, prefix_tokens=5632)
MOONCAKE_LENGTHS = LengthDistribution(
    name="mooncake-like",
    prompt_mean=8596.0 - 0.9 * 5632,  # the rest of the 8,596-token mean after the prefix
    prompt_sigma=1.0,
    prompt_min=16,
    prompt_max=32768,
    output_mean=182.0,
    output_sigma=1.0,
    output_min=4,
    output_max=2048,
    source=MOONCAKE_SOURCE,
)


@dataclass(frozen=True)
class Study:
    name: str
    lengths: str | LengthDistribution
    rate_per_s: float
    ttft_slo_s: float
    prefix: PrefixSharing | None
    prefix_cache_share: float
    why: str


STUDIES = {
    study.name: study
    for study in (
        Study(
            "chatbot",
            "chatbot",
            rate_per_s=100.0,
            ttft_slo_s=1.0,
            prefix=None,
            prefix_cache_share=0.0,
            why=(
                "the built-in chatbot lengths (ShareGPT statistics as DistServe reports them); "
                "TTFT 1 s, the packaged policy's default class; 100 requests/s, a fleet in "
                "which one SRAM deployment is not most of the bill"
            ),
        ),
        Study(
            "mooncake-like",
            MOONCAKE_LENGTHS,
            rate_per_s=25.0,
            ttft_slo_s=10.0,
            prefix=MOONCAKE_PREFIX,
            prefix_cache_share=0.5,
            why=(
                f"{MOONCAKE_SOURCE}; 25 requests/s, about 3.8x the trace's hourly mean of "
                "6.6/s; each device caches prefixes in half of its KV memory"
            ),
        ),
    )
}


def run(study: Study, out: Path, *, window_s: float = WINDOW_S) -> FrontierResult:
    requests = generate_for_duration(
        study.lengths, window_s, rate_per_s=study.rate_per_s, seed=SEED, prefix=study.prefix
    )
    started = time.monotonic()

    def point(fleet: FleetType, found: FrontierPoint, runs: int) -> None:
        what = "unmet" if found.best is None else found.best.candidate.label()
        print(
            f"{study.name}: {fleet.label}, TPOT {found.tpot_slo_s * 1e3:g} ms: {what} "
            f"({runs} runs, {time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    def trial(fleet: FleetType, tpot_s: float, runs: int, trial: PlanTrial) -> None:
        if runs % 100 == 0:
            print(f"  {study.name}: {runs} runs", file=sys.stderr, flush=True)

    result = sweep_frontier(
        MODEL,
        requests,
        lambda: resolve_policy(None),
        ttft_slo_s=study.ttft_slo_s,
        window_s=window_s,
        max_devices=MAX_DEVICES,
        target_attainment=ATTAINMENT,
        prefix_cache_share=study.prefix_cache_share,
        on_point=point,
        on_trial=trial,
    )
    meta: dict[str, Any] = {
        "command": f"python -m bench.frontier --workload {study.name}",
        "workload": {
            "name": study.name,
            "rate_per_s": study.rate_per_s,
            "window_s": window_s,
            "seed": SEED,
            "requests": len(requests),
            "mean_prompt_tokens": sum(r.prompt_tokens for r in requests) / len(requests),
            "mean_output_tokens": sum(r.output_tokens for r in requests) / len(requests),
            "prefix": None if study.prefix is None else study.prefix.__dict__,
            "why": study.why,
        },
        "policy": "default",
    }
    stem = f"frontier-{study.name}"
    for note in write_frontier(out / f"{stem}.json", out / f"{stem}.png", result, meta):
        print(note, file=sys.stderr)
    print(format_frontier(result))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__)
    parser.add_argument("--workload", action="append", choices=sorted(STUDIES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--window-s", type=float, default=WINDOW_S, help="seconds of arrivals")
    options = parser.parse_args()
    for name in options.workload or list(STUDIES):
        run(STUDIES[name], options.out, window_s=options.window_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
