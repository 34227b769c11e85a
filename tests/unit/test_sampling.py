"""Sampling is a pure function of (logits, parameters, seed, position)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends.mock.sampling import _mix64, sample_token, uniform

REPO = Path(__file__).resolve().parents[2]
UNIFORM = np.zeros(258, np.float32)


def probabilities_logits(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64))


def draw(logits: np.ndarray, seed: int, position: int, **params: float) -> int:
    temperature = params.get("temperature", 1.0)
    top_p = params.get("top_p", 1.0)
    return sample_token(logits, temperature=temperature, top_p=top_p, seed=seed, position=position)


def counts(logits: np.ndarray, size: int, draws: int, **params: float) -> np.ndarray:
    tokens = [draw(logits, seed=7, position=p, **params) for p in range(draws)]
    return np.bincount(tokens, minlength=size)


def chi_square(observed: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_whatever_the_seed() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        logits = rng.standard_normal(258).astype(np.float32)
        picks = {draw(logits, seed=s, position=p, temperature=0.0) for s in (0, 9) for p in (0, 5)}
        assert picks == {int(np.argmax(logits))}


def test_same_seed_and_position_give_the_same_token() -> None:
    logits = np.random.default_rng(4).standard_normal(258)
    first = [draw(logits, seed=99, position=p) for p in range(50)]
    again = [draw(logits, seed=99, position=p) for p in range(50)]
    assert first == again


def test_draw_is_pinned_to_splitmix64_of_seed_and_position() -> None:
    # Uniform logits with top_p 1 map the draw u to token floor(u * 258): pins
    # the algorithm, so any change to the generator is caught here.
    tokens = [draw(UNIFORM, seed=12345, position=p) for p in range(8)]
    assert tokens == [128, 118, 138, 254, 126, 124, 172, 179]
    assert tokens == [int(uniform(12345, p) * 258) for p in range(8)]
    assert uniform(0, 0) == 0.8833108082136426


def test_mixer_is_splitmix64() -> None:
    # Known answers: the first outputs of SplitMix64 seeded with 0.
    gamma = 0x9E3779B97F4A7C15
    assert _mix64(gamma) == 0xE220A8397B1DCDAF
    assert _mix64((2 * gamma) % 2**64) == 0x6E789E6AA1B965F4


def test_uniform_is_in_the_unit_interval_with_53_bits() -> None:
    draws = [uniform(seed, p) for seed in (0, 1, 2**64 - 1) for p in range(200)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert all((u * 2**53).is_integer() for u in draws)
    assert len(set(draws)) == len(draws)
    assert abs(float(np.mean(draws)) - 0.5) < 0.05


def test_another_process_draws_the_same_tokens() -> None:
    code = (
        "import numpy as np\n"
        "from backends.mock.sampling import sample_token\n"
        "logits = np.random.default_rng(5).standard_normal(258)\n"
        "print([sample_token(logits, temperature=0.8, top_p=0.9, seed=2**63 + 11, position=p)"
        " for p in range(40)])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    logits = np.random.default_rng(5).standard_normal(258)
    here = [
        draw(logits, seed=2**63 + 11, position=p, temperature=0.8, top_p=0.9) for p in range(40)
    ]
    assert result.stdout.strip() == str(here)


def test_different_seeds_give_different_tokens() -> None:
    first = [draw(UNIFORM, seed=1, position=p) for p in range(64)]
    second = [draw(UNIFORM, seed=2, position=p) for p in range(64)]
    assert sum(a != b for a, b in zip(first, second, strict=True)) > 48


def test_positions_are_independent_draws() -> None:
    tokens = [draw(UNIFORM, seed=1, position=p) for p in range(64)]
    assert len(set(tokens)) > 40


def test_tiny_top_p_is_argmax() -> None:
    logits = np.random.default_rng(6).standard_normal(258)
    tokens = {draw(logits, seed=3, position=p, temperature=5.0, top_p=1e-9) for p in range(100)}
    assert tokens == {int(np.argmax(logits))}


def test_ties_keep_the_lower_token_id_first() -> None:
    logits = np.full(258, -10.0)
    logits[[7, 3]] = 5.0
    tokens = {draw(logits, seed=3, position=p, top_p=1e-9) for p in range(50)}
    assert tokens == {3}


def test_nucleus_keeps_only_the_top_mass() -> None:
    logits = probabilities_logits([0.5, 0.3, 0.15, 0.05])
    observed = counts(logits, 4, 3000, top_p=0.75)
    assert observed[2] == observed[3] == 0
    assert chi_square(observed[:2], np.array([0.5, 0.3]) / 0.8) < 10.83  # df 1, p = 0.001


def test_draws_follow_the_probabilities() -> None:
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    observed = counts(probabilities_logits(list(probs)), 4, 4000)
    assert chi_square(observed, probs) < 16.27  # df 3, p = 0.001


def test_temperature_flattens_the_distribution() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    scaled = np.exp(logits / 2.0)
    observed = counts(logits, 4, 4000, temperature=2.0)
    assert chi_square(observed, scaled / scaled.sum()) < 16.27


def test_float32_and_float64_logits_agree() -> None:
    logits = np.random.default_rng(8).standard_normal(258).astype(np.float32)
    for p in range(30):
        assert draw(logits, seed=5, position=p) == draw(logits.astype(np.float64), 5, p)


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_the_whole_uint64_seed_range_works(seed: int) -> None:
    token = draw(UNIFORM, seed=seed, position=0)
    assert 0 <= token < 258
    assert token == draw(UNIFORM, seed=seed, position=0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"seed": 2**64}, "uint64"),
        ({"seed": -1}, "uint64"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"position": -1}, "position"),
    ],
)
def test_invalid_arguments_are_rejected(params: dict[str, float], message: str) -> None:
    arguments: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "seed": 0, "position": 0}
    arguments.update(params)
    with pytest.raises(ValueError, match=message):
        sample_token(
            UNIFORM,
            temperature=arguments["temperature"],
            top_p=arguments["top_p"],
            seed=int(arguments["seed"]),
            position=int(arguments["position"]),
        )
