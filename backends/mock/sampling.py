"""Reproducible sampling: the token at a position is a pure function of the
logits, the sampling parameters, the request's seed and the position.

No generator state lives between calls, so a request whose prefill ran on one
device and whose decode runs on another draws exactly the numbers one device
would have drawn: the uniform for position ``p`` is a SplitMix64 hash of
``(seed, p)`` computed with Python integers, identical on every host and numpy
version, and ~20x cheaper than building a numpy Generator per token.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

_MAX_SEED = 2**64 - 1
_MASK = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (odd, golden ratio)
_UNIT = 2.0**-53


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection on uint64 with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def uniform(seed: int, position: int) -> float:
    """The draw in [0, 1) for ``position``: 53 bits of the position-th SplitMix64 output.

    The seed is hashed first so that seeds differing by the increment do not
    give shifted copies of one stream.
    """
    state = (_mix64(seed) + _GAMMA * (position + 1)) & _MASK
    return (_mix64(state) >> 11) * _UNIT


def sample_token(
    logits: NDArray[np.floating], *, temperature: float, top_p: float, seed: int, position: int
) -> int:
    """The token id drawn at ``position``: greedy at temperature 0, else nucleus sampling.

    With ``top_p`` < 1, the smallest set of most probable tokens (ties broken
    by lower token id) whose probability reaches ``top_p`` is kept (values
    <= 0 keep only the most probable token) and the draw walks it from the most
    probable down. With ``top_p`` >= 1 nothing is cut, so no sort is needed: the
    draw walks the vocabulary in id order (a different but equally valid
    inverse-CDF mapping, and ~4 us cheaper).
    """
    _check(temperature, seed, position)
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    weights = np.exp(scaled - scaled.max())
    vocab = weights.shape[0]
    # Unnormalised cumulative mass (cumsum is sequential by definition): the
    # thresholds scale with the total instead of dividing every weight.
    if top_p >= 1:
        cumulative = np.cumsum(weights)
        kept = vocab
        order = None
    else:
        order = np.argsort(-scaled, kind="stable")
        cumulative = np.cumsum(weights[order])
        kept = min(int(np.searchsorted(cumulative, top_p * cumulative[-1])) + 1, vocab)
    # One draw per position, scaled to the kept mass, i.e. renormalised.
    draw = uniform(seed, position) * float(cumulative[kept - 1])
    index = min(int(np.searchsorted(cumulative, draw, side="right")), kept - 1)
    return index if order is None else int(order[index])


def _check(temperature: float, seed: int, position: int) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be a uint64, got {seed}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
