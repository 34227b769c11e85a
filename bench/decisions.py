"""How long one scheduling decision takes over a pool of 64 backends.

The pool is what a busy daemon sees: half prefill (H100) and half decode (Groq LPU)
deployments of Llama-3.1-8B with random queues, batches and KV use, a few unhealthy,
and a prefix index in which each of 16 shared system prompts lives on two backends (as
affinity routing leaves them). Requests mix those prompts with unique ones. Each
decision is timed alone, as the dispatcher calls it, prompt hashing excluded (the front
door does that once per request).
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from pathlib import Path

import yaml

from backends.base import Role
from backends.errors import ServingError
from backends.prefix import block_hashes
from router.scheduling.perf import perf_for
from router.scheduling.plan import Disaggregation, RequestFeatures
from router.scheduling.prefix import PrefixIndex
from router.scheduling.registry import DEFAULT_POLICY_PATH, load_policy, parse_policy
from router.scheduling.scheduler import Scheduler
from router.scheduling.snapshot import BackendView, PoolSnapshot
from router.sim.metrics import percentile

BACKENDS = 64
MODEL = "llama-3.1-8b"


def pool(seed: int = 3) -> tuple[PoolSnapshot, list[str]]:
    rng = random.Random(seed)
    index = PrefixIndex()
    systems = [f"System prompt {k}: you are assistant number {k}. " * 30 for k in range(16)]
    for k, system in enumerate(systems):
        for replica in (2 * k, 2 * k + 1):
            index.record(f"b{replica % BACKENDS}", block_hashes(system))
    views = []
    for i in range(BACKENDS):
        profile = "h100" if i % 2 else "groq-lpu"
        running = rng.randrange(0, 64)
        views.append(
            BackendView(
                id=f"b{i}",
                kind="mock",
                address=f"127.0.0.1:{20000 + i}",
                role=Role.PREFILL if i % 2 else Role.DECODE,
                model=MODEL,
                profile=profile,
                healthy=rng.random() > 0.05,
                outstanding=rng.randrange(0, 32),
                queued_prefill_tokens=rng.randrange(0, 8192),
                running=running,
                context_tokens=running * rng.randrange(200, 2000),
                perf=perf_for(profile, MODEL),
            )
        )
    prompts = [
        (systems[k % 16] if k % 3 else "") + f"user question {k} " * rng.randrange(1, 60)
        for k in range(256)
    ]
    return PoolSnapshot(tuple(views), index), prompts


def decision_times_us(scheduler: Scheduler, count: int, seed: int = 3) -> list[float]:
    snapshot, prompts = pool(seed)
    rng = random.Random(seed)
    requests = []
    for n in range(count):
        prompt = prompts[n % len(prompts)]
        requests.append(
            RequestFeatures(
                request_id=str(n),
                model=MODEL,
                prompt_tokens=len(prompt) + 1,
                max_tokens=rng.randrange(16, 512),
                disaggregation=Disaggregation.AUTO,
                sequence=n,
                prefix_hashes=block_hashes(prompt),
            )
        )
    timings = []
    gc.collect()
    for features in requests:
        started = time.perf_counter_ns()
        with contextlib.suppress(ServingError):  # shed by admission: a decision too
            scheduler.schedule(features, snapshot, 0.0)
        timings.append((time.perf_counter_ns() - started) / 1000)
    return timings


def decision_figures(count: int, policy_file: Path | None = None) -> dict[str, float]:
    """p50 and p99 of the packaged policy, and of the same policy scoring every backend."""
    default = load_policy(policy_file)
    times = decision_times_us(default, count)
    full_scan = parse_policy(_without_sampling(policy_file))
    scan_times = decision_times_us(full_scan, max(count // 4, 100))
    return {
        "decision_p50_us": percentile(times, 50),
        "decision_p99_us": percentile(times, 99),
        "decision_full_scan_p50_us": percentile(scan_times, 50),
        "decision_full_scan_p99_us": percentile(scan_times, 99),
    }


def _without_sampling(policy_file: Path | None) -> object:
    raw = yaml.safe_load((policy_file or DEFAULT_POLICY_PATH).read_text())
    for profile in raw["profiles"].values():
        profile["sample"] = 0
    return raw
