"""python -m bench.auto_split [--quick] [--files DIR]: does deciding per request pay?

Mixed traffic (the ``mixed`` mix of router/sim/workload.py: 40% code completion, 40%
chat, 20% summarization, each held to its own SLO class, DistServe's targets in
router/scheduling/slo.py) served by Llama-3.1-70B fleets, each simulated with the
router's own policy four ways that differ in the decider alone: ``auto`` (the packaged
cost-model decider, marginal costs), ``auto-list-price`` (the same, comparing plain
device costs), ``always`` split and ``never`` split.

Per fleet and decider the figure is the goodput of studies.py (the highest request rate
at which 90% of requests meet their class's SLO, over 30 s of Poisson arrivals, the mean
of three seeds), per dollar-hour of the fleet; the ratios are auto's over each fixed
mode's. On one fleet, the same requests at auto's goodput rate are also simulated as
``hetero-router simulate`` does (the daemon's admission settings), with each class's
attainment and share split: which requests each decider gets wrong. ``--files DIR``
writes that fleet's cluster file and the four policy files, to run it again with
``hetero-router simulate``. Results go to bench/results/auto-split.json.
All figures are modelled (router/sim), not measured on hardware.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.report import RESULTS_DIR, machine, write_result
from bench.studies import Policy, cluster_of, group, max_goodput
from router.scheduling.registry import DEFAULT_POLICY_PATH, parse_policy
from router.scheduling.scheduler import Scheduler
from router.scheduling.slo import SLO_PRESETS, Slo
from router.settings import settings_from
from router.sim.cluster import Cluster
from router.sim.results import SimResult
from router.sim.simulator import Simulator
from router.sim.workload import MIXES, RequestSpec, generate

MIX = "mixed"
MODEL = "llama-3.1-70b"
# Each class of the mix is held to the DistServe SLO of its workload.
CLASS_SLOS: dict[str, Slo] = {part.slo_class: SLO_PRESETS[part.workload] for part in MIXES[MIX]}
# None: the packaged profile's own decider.
DECIDERS: dict[str, object] = {
    "auto": None,
    "auto-list-price": {"name": "cost-model", "marginal": False},
    "always": "always",
    "never": "never",
}
FIXED = ("always", "never")

H100 = "h100"
WSE3 = "cerebras-wse3"
FLEETS: dict[str, tuple[dict[str, Any], ...]] = {
    "2 H100 prefill + 2 H100 decode": (
        group("p", H100, "prefill", 2),
        group("d", H100, "decode", 2),
    ),
    "1 H100 prefill + 3 H100 decode": (
        group("p", H100, "prefill", 1),
        group("d", H100, "decode", 3),
    ),
    "4 H100 both": (group("b", H100, "both", 4),),
    "2 H100 prefill + 2 H100 both": (
        group("p", H100, "prefill", 2),
        group("b", H100, "both", 2),
    ),
    "2 H100 prefill + 1 H100 decode + 1 H100 both": (
        group("p", H100, "prefill", 2),
        group("d", H100, "decode", 1),
        group("b", H100, "both", 1),
    ),
    "2 H100 prefill + 1 WSE-3 decode": (
        group("p", H100, "prefill", 2),
        group("w", WSE3, "decode", 1),
    ),
    "3 H100 both + 1 WSE-3 decode": (
        group("b", H100, "both", 3),
        group("w", WSE3, "decode", 1),
    ),
}
HEADLINE = "2 H100 prefill + 2 H100 decode"


@dataclass(frozen=True)
class Sizes:
    fleets: tuple[str, ...]
    seeds: tuple[int, ...]
    duration_s: float  # seconds of arrivals per run of the goodput search
    same_duration_s: float  # seconds of arrivals of the same-requests run (its tail counts less)


FULL = Sizes(tuple(FLEETS), (5, 11, 23), 30.0, 120.0)
QUICK = Sizes(
    (HEADLINE, "2 H100 prefill + 2 H100 both", "2 H100 prefill + 1 WSE-3 decode"),
    (11,),
    15.0,
    30.0,
)


def mixed_policy(decider: object = None) -> dict[str, Any]:
    """The packaged policy with a profile per class of the mix: each a copy of the
    default profile holding its class's SLO, with ``decider`` in place of its own."""
    raw = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    base = raw["profiles"]["default"]
    if isinstance(decider, dict) and decider.get("name") == base["decider"]["name"]:
        base = {**base, "decider": {**base["decider"], **decider}}  # its options, and these
    elif decider is not None:
        base = {**base, "decider": decider}
    profiles = {"default": base}
    for name, slo in CLASS_SLOS.items():
        profile = copy.deepcopy(base)
        profile["slo"] = {"ttft_ms": _ms(slo.ttft_s), "tpot_ms": _ms(slo.tpot_s)}
        profiles[name] = profile
    return {"profiles": profiles}


def policy_of(decider: object) -> Policy:
    """A fresh scheduler per run (a picker's rotation is never shared between runs)."""
    raw = mixed_policy(decider)
    return lambda: parse_policy(raw)


def _ms(limit_s: float | None) -> float:
    if limit_s is None:
        raise ValueError("every class of the mix needs TTFT and TPOT targets")
    return limit_s * 1000


def requests(duration_s: float, seed: int) -> Callable[[float], list[RequestSpec]]:
    """``duration_s`` seconds of the mix at the asked rate (at least 300 requests)."""
    return lambda rate: generate(MIX, max(300, int(rate * duration_s)), rate_per_s=rate, seed=seed)


def fleet(name: str) -> Cluster:
    return cluster_of(MODEL, *FLEETS[name])


# ---------------------------------------------------------------- goodput per dollar


def goodput_per_dollar(name: str, sizes: Sizes) -> dict[str, Any]:
    """Each decider's goodput on the fleet (mean over seeds), per dollar-hour, and
    auto's ratios to the fixed modes."""
    cluster = fleet(name)
    price = cluster.price_per_hour_usd
    deciders: dict[str, Any] = {}
    for decider, config in DECIDERS.items():
        rates = [
            max_goodput(
                cluster,
                policy_of(config),
                requests(sizes.duration_s, seed),
                CLASS_SLOS,
                start_rate=2.0,
            ).rate
            for seed in sizes.seeds
        ]
        mean = float(np.mean(rates))
        deciders[decider] = {
            "goodput": mean,
            "goodput_by_seed": rates,
            "goodput_per_usd_hour": mean / price,
        }
    auto = deciders["auto"]["goodput"]
    ratios = {f"auto_over_{fixed}": _ratio(auto, deciders[fixed]["goodput"]) for fixed in FIXED}
    best_fixed = max(deciders[fixed]["goodput"] for fixed in FIXED)
    ratios["auto_over_best_fixed"] = _ratio(auto, best_fixed)
    ratios["auto_over_list_price"] = _ratio(auto, deciders["auto-list-price"]["goodput"])
    return {
        "devices": [dict(g) for g in FLEETS[name]],
        "price_per_hour_usd": price,
        "deciders": deciders,
        "ratios": ratios,
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


# ---------------------------------------------------------------- one rate, same requests


def same_requests(name: str, rate: float, count: int, seed: int) -> dict[str, Any]:
    """The same requests through each decider, as ``hetero-router simulate`` runs them:
    goodput per dollar-hour, and per class the attainment and the share split."""
    cluster = fleet(name)
    specs = generate(MIX, count, rate_per_s=rate, seed=seed)
    runs: dict[str, Any] = {}
    for decider, config in DECIDERS.items():
        result = simulate(cluster, parse_policy(mixed_policy(config)), specs)
        summary = result.summary(CLASS_SLOS)
        runs[decider] = {
            "goodput_per_usd_hour": summary.goodput_per_usd_hour,
            "goodput": summary.goodput,
            "slo_attainment": summary.slo_attainment,
            "split_fraction": summary.split_fraction,
            "by_class": _by_class(result),
        }
    return {"rate_per_s": rate, "requests": count, "seed": seed, "deciders": runs}


def simulate(cluster: Cluster, policy: Scheduler, specs: Sequence[RequestSpec]) -> SimResult:
    """One run with the daemon's admission settings, as the simulate command makes it."""
    settings = settings_from({})
    simulator = Simulator(
        cluster,
        policy,
        load_report_interval_s=settings.health_interval_s,
        max_in_flight=settings.max_in_flight,
        queue_limit=settings.queue_limit,
    )
    return simulator.run(specs)


def _by_class(result: SimResult) -> dict[str, dict[str, float]]:
    good = result.good(CLASS_SLOS)
    figures = {}
    for name, slo in CLASS_SLOS.items():
        mine = result.slo_class == name
        with np.errstate(invalid="ignore"):
            figures[name] = {
                "attainment": float(good[mine].mean()),
                "split_fraction": float(result.split[mine & result.ok].mean()),
                "ttft_missed": float((~(result.ttft_s[mine] <= (slo.ttft_s or math.inf))).mean()),
                "tpot_missed": float((result.tpot_s[mine] > (slo.tpot_s or math.inf)).mean()),
            }
    return figures


# ---------------------------------------------------------------- the run


def run(sizes: Sizes, files: Path | None = None) -> dict[str, Any]:
    started, cpu_started = time.monotonic(), time.process_time()
    fleets: dict[str, Any] = {}
    for name in sizes.fleets:
        _say(f"{name}: goodput of {', '.join(DECIDERS)}")
        fleets[name] = goodput_per_dollar(name, sizes)
        _say(_row(name, fleets[name]))
    headline = fleets[HEADLINE]
    rate = round(headline["deciders"]["auto"]["goodput"])
    count = int(rate * sizes.same_duration_s)
    seed = sizes.seeds[0]
    _say(f"{HEADLINE}: the same {count} requests at {rate}/s through each decider")
    same = same_requests(HEADLINE, rate, count, seed)
    if files is not None:
        write_files(files, HEADLINE)
    ratios = {name: fleet_result["ratios"] for name, fleet_result in fleets.items()}
    return {
        "scenario": "auto-split",
        "mode": "quick" if sizes is QUICK else "full",
        "model": MODEL,
        "workload": {
            "mix": [
                {"workload": p.workload, "share": p.share, "slo_class": p.slo_class}
                for p in MIXES[MIX]
            ],
            "duration_s": sizes.duration_s,
            "seeds": list(sizes.seeds),
            "arrivals": "poisson",
        },
        "slo_classes": {
            name: {"ttft_ms": _ms(slo.ttft_s), "tpot_ms": _ms(slo.tpot_s), "source": slo.source}
            for name, slo in CLASS_SLOS.items()
        },
        "goodput": "highest rate with >= 90% of requests within their class's SLO",
        "headline": {
            "fleet": HEADLINE,
            "auto_per_usd_hour": headline["deciders"]["auto"]["goodput_per_usd_hour"],
            "always_per_usd_hour": headline["deciders"]["always"]["goodput_per_usd_hour"],
            "never_per_usd_hour": headline["deciders"]["never"]["goodput_per_usd_hour"],
            **headline["ratios"],
            "worst_auto_over_best_fixed": min(
                r["auto_over_best_fixed"] or 0.0 for r in ratios.values()
            ),
        },
        "fleets": fleets,
        "same_requests": {"fleet": HEADLINE, **same},
        "command": "python -m bench.auto_split" + (" --quick" if sizes is QUICK else ""),
        "cpu_s": time.process_time() - cpu_started,
        "wall_s": time.monotonic() - started,
        "machine": machine(),
    }


def write_files(directory: Path, name: str) -> None:
    """The fleet's cluster file and one policy file per decider, for ``simulate``."""
    directory.mkdir(parents=True, exist_ok=True)
    cluster = {"model": MODEL, "groups": [dict(g) for g in FLEETS[name]]}
    (directory / "cluster.yaml").write_text(yaml.safe_dump(cluster, sort_keys=False))
    for decider, config in DECIDERS.items():
        policy = yaml.safe_dump(mixed_policy(config), sort_keys=False)
        (directory / f"policy-{decider}.yaml").write_text(policy)


def _row(name: str, figures: Mapping[str, Any]) -> str:
    deciders = figures["deciders"]
    cells = "  ".join(
        f"{d} {deciders[d]['goodput']:.1f}/s {deciders[d]['goodput_per_usd_hour']:.3f}/$h"
        for d in DECIDERS
    )
    return f"{name} (${figures['price_per_hour_usd']:.0f}/h): {cells}"


def report(result: Mapping[str, Any]) -> str:
    """The figures as a table: goodput per dollar-hour and auto's ratios, per fleet."""
    header = (
        f"{'fleet':46} {'$/h':>6} " + " ".join(f"{d:>15}" for d in DECIDERS) + "  auto/always"
        "  auto/never"
    )
    lines = [
        f"goodput per dollar-hour (requests/s at 90% within class SLO, per $/h), {MODEL}, "
        f"mix {MIX}",
        header,
    ]
    for name, figures in result["fleets"].items():
        deciders, ratios = figures["deciders"], figures["ratios"]
        cells = " ".join(f"{deciders[d]['goodput_per_usd_hour']:>15.4f}" for d in DECIDERS)
        lines.append(
            f"{name:46} {figures['price_per_hour_usd']:>6.1f} {cells}  "
            f"{_x(ratios['auto_over_always']):>11}  {_x(ratios['auto_over_never']):>10}"
        )
    same = result["same_requests"]
    lines.append("")
    lines.append(
        f"{same['fleet']}, the same {same['requests']} requests at {same['rate_per_s']}/s "
        f"(seed {same['seed']}): goodput per $/h, attainment, share split by class"
    )
    for decider, run_figures in same["deciders"].items():
        classes = "  ".join(
            f"{c} {f['attainment']:.0%} split {f['split_fraction']:.0%}"
            for c, f in run_figures["by_class"].items()
        )
        lines.append(
            f"  {decider:16} {run_figures['goodput_per_usd_hour']:.4f}/$h  "
            f"attainment {run_figures['slo_attainment']:.1%}  {classes}"
        )
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


async def scenario(quick: bool, out_dir: Path) -> dict[str, Any]:
    """``python -m bench --scenario auto_split``."""
    result = run(QUICK if quick else FULL)
    write_result("auto-split", result, out_dir)
    print(report(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auto_split", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="three fleets, one seed")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where auto-split.json goes")
    parser.add_argument(
        "--files", type=Path, help="write the headline fleet's cluster and policy files here"
    )
    options = parser.parse_args(argv)
    result = run(QUICK if options.quick else FULL, options.files)
    path = write_result("auto-split", result, options.out)
    print(report(result))
    print(f"results in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
