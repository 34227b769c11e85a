"""Scheduling scenario: the studies of when splitting pays, and how good the scheduler is.

- split vs colocated goodput per GPU, H100 only, Llama-3.1-70B, chatbot, tight TPOT;
  and the crossover sweep (Llama-3.1-8B, prompt length x link speed) where it loses;
- H100 prefill + SRAM-class decode against H100 colocated at the same cost per hour;
- the packaged SLO- and prefix-aware policy against round-robin on a mixed workload
  with shared prefixes;
- decision time over 64 backends, simulator speed, and the simulator against a live
  mock cluster (bench/fidelity.py).

All but the last are simulated (router/sim) with the mock devices' timing model, so
every goodput here is *modelled*. Figures go to bench/results/scheduling.json.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import plots
from bench.decisions import decision_figures
from bench.fidelity import fidelity
from bench.report import check, machine, write_result
from bench.studies import (
    TIGHT,
    cluster_of,
    fixed_lengths,
    fixed_policy,
    group,
    hetero_per_dollar,
    max_goodput,
    mixed_workload,
    packaged_policy,
    policy_comparison,
    sim_cpu_seconds_per_sim_hour,
    split_vs_colocated,
    workload,
)
from router.scheduling.slo import SLO_PRESETS, Slo
from router.sim.workload import PrefixSharing

# The packaged policy's default SLO class (router/defaults/policy.yaml).
DEFAULT_CLASS = Slo(name="default-class", ttft_s=1.0, tpot_s=0.05, source="policy.yaml default")
# Chat behind 128 shared 2048-token prefixes (system prompts, few-shot templates) for 80%
# of requests; 20% summarization with nothing shared.
SHARED = PrefixSharing(fraction=0.8, groups=128, prefix_tokens=2048)


@dataclass(frozen=True)
class Sizes:
    duration_s: float  # seconds of arrivals per simulated run
    crossover_prompts: tuple[int, ...]
    prefill_counts: tuple[int, ...]
    sim_seconds: float  # simulated for the speed figure (scaled to an hour)
    decisions: int


QUICK = Sizes(30.0, (64, 2048), (4, 8), 300.0, 20000)
FULL = Sizes(120.0, (32, 128, 512, 2048), (1, 2, 4, 8, 16), 3600.0, 100000)


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    started = time.monotonic()
    result: dict[str, Any] = {"scenario": "scheduling", "mode": "quick" if quick else "full"}

    _say("decision time, 64 backends")
    decisions = decision_figures(sizes.decisions)

    _say("split vs colocated, H100, Llama-3.1-70B, chatbot, tight TPOT")
    chat = workload("chatbot", sizes.duration_s)
    split_70b = split_vs_colocated("llama-3.1-70b", 4, chat, TIGHT)

    crossover = []
    for prompt in sizes.crossover_prompts:
        for link in (100.0, None):
            _say(f"crossover, Llama-3.1-8B, {prompt}-token prompts, link {link or 'NVLink'}")
            cell = split_vs_colocated(
                "llama-3.1-8b", 4, fixed_lengths(sizes.duration_s, prompt, 200), TIGHT,
                link_gbps=link,
            )  # fmt: skip
            crossover.append({"prompt_tokens": prompt, "link_gbps": link or 7200.0, **cell})

    hetero = {}
    for decode in ("groq-lpu", "cerebras-wse3"):
        _say(f"H100 prefill + {decode} decode vs H100 colocated, same $/h")
        hetero[decode] = hetero_per_dollar(
            "llama-3.1-70b", decode, chat, TIGHT, sizes.prefill_counts
        )
    best_sram = max(hetero, key=lambda k: hetero[k]["ratio"])
    _say("the sram-decode SLO (5 ms TPOT): H100 colocated, and each SRAM part's best mix")
    sram_slo = SLO_PRESETS["sram-decode"]
    h100_at_sram_slo = max_goodput(
        cluster_of("llama-3.1-70b", group("h", "h100", "both", 4)),
        fixed_policy("never"),
        chat,
        sram_slo,
    ).rate
    for decode, study in hetero.items():
        prefill = int(study["best"].split("x", 1)[0])
        mix = cluster_of(
            "llama-3.1-70b",
            group("p", "h100", "prefill", prefill),
            group("d", decode, "decode", 1),
        )
        rate = max_goodput(mix, fixed_policy("always"), chat, sram_slo).rate
        study["at_sram_decode_slo"] = {
            "mix": study["best"],
            "goodput": rate,
            "goodput_per_usd_hour": rate / mix.price_per_hour_usd,
        }

    policies: dict[str, dict[str, float]] = {}
    for blocks in (4096, 1024):
        _say(f"policies, 8x H100 Llama-3.1-8B, prefix cache {blocks} blocks, mixed workload")
        cluster = cluster_of(
            "llama-3.1-8b", group("h", "h100", "both", 8, prefix_cache_blocks=blocks)
        )
        policies[str(blocks)] = policy_comparison(
            cluster,
            mixed_workload(sizes.duration_s, SHARED),
            DEFAULT_CLASS,
            {
                "round-robin": fixed_policy("never", "round-robin"),
                "least-outstanding": fixed_policy("never"),
                "packaged": packaged_policy,
            },
        )

    _say(f"simulator speed: {sizes.sim_seconds:.0f} simulated s, 16 devices, 100 req/s")
    speed = sim_cpu_seconds_per_sim_hour(sizes.sim_seconds)

    _say("simulator against a live mock cluster (time scale 1)")
    live = await fidelity(quick)

    headline_policy = policies["4096"]
    figures: dict[str, Any] = {
        "split_vs_colocated_goodput": split_70b["ratio"],
        "hetero_goodput_per_dollar_ratio": hetero[best_sram]["ratio"],
        "slo_aware_vs_round_robin_goodput": _ratio(
            headline_policy["packaged"], headline_policy["round-robin"]
        ),
        "slo_aware_vs_round_robin_goodput_small_cache": _ratio(
            policies["1024"]["packaged"], policies["1024"]["round-robin"]
        ),
        "decision_p99_us": decisions["decision_p99_us"],
        "decision_p50_us": decisions["decision_p50_us"],
        "decision_full_scan_p99_us": decisions["decision_full_scan_p99_us"],
        "sim_vs_live_mean_error": live["sim_vs_live_mean_error"],
        "sim_vs_live_p99_error": live["sim_vs_live_p99_error"],
        "sim_cpu_seconds_per_sim_hour": speed["cpu_seconds_per_sim_hour"],
        "h100_colocated_goodput_at_5ms_tpot": h100_at_sram_slo,
        "hetero_goodput_at_5ms_tpot": {
            decode: study["at_sram_decode_slo"]["goodput"] for decode, study in hetero.items()
        },
        "split_loses_cells": sum(1 for cell in crossover if cell["ratio"] < 1.0),
    }
    result.update(
        figures=figures,
        studies={
            "split_vs_colocated_70b": split_70b,
            "crossover_8b": crossover,
            "hetero_per_dollar": hetero,
            "hetero_best": best_sram,
            "policies_by_prefix_cache_blocks": policies,
            "sim_speed": speed,
            "sim_vs_live": live,
            "decisions": decisions,
        },
        slos={
            "tight": TIGHT.__dict__,
            "default_class": DEFAULT_CLASS.__dict__,
            "sram_decode": sram_slo.__dict__,
        },
        targets={
            "split_vs_colocated_goodput": check(
                figures["split_vs_colocated_goodput"], at_least=1.5
            ),
            "hetero_goodput_per_dollar_ratio": check(
                figures["hetero_goodput_per_dollar_ratio"], at_least=2.0
            ),
            "slo_aware_vs_round_robin_goodput": check(
                figures["slo_aware_vs_round_robin_goodput"], at_least=1.3
            ),
            "decision_p99_us": check(figures["decision_p99_us"], at_most=100.0),
            "sim_vs_live_mean_error": check(figures["sim_vs_live_mean_error"], at_most=0.03),
            "sim_vs_live_p99_error": check(figures["sim_vs_live_p99_error"], at_most=0.05),
            "sim_cpu_seconds_per_sim_hour": check(
                figures["sim_cpu_seconds_per_sim_hour"], at_most=60.0
            ),
        },
        headline={
            "split/colocated": round(figures["split_vs_colocated_goodput"], 2),
            "SRAM $ ratio": round(figures["hetero_goodput_per_dollar_ratio"], 2),
            "policy/RR": round(figures["slo_aware_vs_round_robin_goodput"], 2),
            "decision p99 us": round(figures["decision_p99_us"], 1),
            "sim err mean": round(figures["sim_vs_live_mean_error"], 4),
            "sim err p99": round(figures["sim_vs_live_p99_error"], 4),
            "sim CPU s/h": round(figures["sim_cpu_seconds_per_sim_hour"], 1),
        },
        note="goodput = highest request rate with >= 90% of requests meeting the SLO; "
        "every goodput here is modelled by the simulator, not measured on hardware",
        wall_s=round(time.monotonic() - started, 1),
        sizes=sizes.__dict__,
        machine=machine(),
    )
    plots.scheduling(out_dir / "scheduling.png", result)
    write_result("scheduling", result, out_dir)
    return result


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf
