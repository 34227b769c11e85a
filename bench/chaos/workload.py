"""What the chaos run sends: Poisson arrivals of chat-like requests, split or colocated,
greedy or sampled with a seed of their own. Pure and seeded: the fault-free run and
the chaos run send the very same requests at the same offsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from router.sim.workload import WORKLOADS, poisson_arrivals

Mode = Literal["split", "colocated"]
SAMPLED_TEMPERATURE = 0.8
SAMPLED_TOP_P = 0.95


@dataclass(frozen=True)
class ChaosRequest:
    index: int
    arrival_s: float  # offset from the start of the load
    prompt_tokens: int
    output_tokens: int  # max_tokens (the mock may stop earlier on its end token)
    mode: Mode
    temperature: float  # 0: greedy
    top_p: float
    seed: int

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


def chaos_requests(
    *,
    duration_s: float,
    rate_per_s: float,
    seed: int,
    prompt_cap: int,
    output_cap: int,
    split_share: float = 0.5,
    sampled_share: float = 0.5,
) -> list[ChaosRequest]:
    """Requests arriving within ``duration_s``, chatbot lengths capped at the caps."""
    rng = np.random.default_rng(seed)
    expected = rate_per_s * duration_s
    drawn = int(expected + 6 * np.sqrt(expected) + 16)
    arrivals = [t for t in poisson_arrivals(rate_per_s, drawn, rng) if t < duration_s]
    lengths = WORKLOADS["chatbot"].sample(rng, len(arrivals))
    splits = rng.random(len(arrivals)) < split_share
    sampled = rng.random(len(arrivals)) < sampled_share
    seeds = rng.integers(0, 2**32, len(arrivals))
    return [
        ChaosRequest(
            index=index,
            arrival_s=arrival,
            prompt_tokens=min(prompt, prompt_cap),
            output_tokens=min(output, output_cap),
            mode="split" if split else "colocated",
            temperature=SAMPLED_TEMPERATURE if sample else 0.0,
            top_p=SAMPLED_TOP_P if sample else 1.0,
            seed=int(request_seed),
        )
        for index, (arrival, (prompt, output), split, sample, request_seed) in enumerate(
            zip(arrivals, lengths, splits, sampled, seeds, strict=True)
        )
    ]
