"""Reproducible sampling: the token at a position is a pure function of the
logits, the sampling parameters, the request's seed and the position.

No generator state lives between calls, so a request whose prefill ran on one
device and whose decode runs on another draws exactly the numbers one device
would have drawn: the uniform for position ``p`` comes from
``np.random.default_rng([seed, p])`` wherever it is computed.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

_MAX_SEED = 2**64 - 1


def sample_token(
    logits: NDArray[np.floating], *, temperature: float, top_p: float, seed: int, position: int
) -> int:
    """The token id drawn at ``position``: greedy at temperature 0, else nucleus sampling.

    ``top_p`` keeps the smallest set of most probable tokens (ties broken by
    lower token id) whose probability reaches ``top_p``; values >= 1 keep all,
    values <= 0 keep only the most probable token.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be a uint64, got {seed}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    if temperature == 0:
        return int(np.argmax(logits))
    order, cumulative = _sorted_cumulative(logits, temperature)
    kept = _nucleus_size(cumulative, top_p)
    # One draw per position; scaled to the kept mass, i.e. renormalised.
    draw = np.random.default_rng([seed, position]).random() * cumulative[kept - 1]
    index = int(np.searchsorted(cumulative[:kept], draw, side="right"))
    return int(order[min(index, kept - 1)])


def _sorted_cumulative(
    logits: NDArray[np.floating], temperature: float
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Token ids by falling probability (stable: ties by id) and their cumulative probability."""
    scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    return order, np.cumsum(probs[order])


def _nucleus_size(cumulative: NDArray[np.float64], top_p: float) -> int:
    """Smallest k whose top-k mass reaches ``top_p`` (rounding cannot drop the tail at 1.0)."""
    if top_p >= 1:
        return len(cumulative)
    return min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, len(cumulative))
