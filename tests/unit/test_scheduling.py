from __future__ import annotations

import pytest

from backends.base import HandoffMode, Role
from router.errors import ConfigError, NoHealthyBackendError
from router.scheduling.deciders import PromptLengthDecider
from router.scheduling.pickers import LeastOutstandingPicker
from router.scheduling.plan import Disaggregation, Mode, RequestFeatures
from router.scheduling.registry import build_scheduler, parse_policy
from router.scheduling.snapshot import BackendView, PoolSnapshot
from router.settings import Settings


def view(backend_id: str, role: Role, *, outstanding: int = 0, healthy: bool = True,
         model: str = "m") -> BackendView:  # fmt: skip
    return BackendView(backend_id, "mock", "127.0.0.1:1", role, model, "", healthy, outstanding)


def features(prompt_tokens: int = 10, mode: Disaggregation = Disaggregation.AUTO,
             sequence: int = 0, model: str = "m") -> RequestFeatures:  # fmt: skip
    return RequestFeatures("r", model, prompt_tokens, 16, mode, sequence)


POOL = PoolSnapshot(
    (
        view("p0", Role.PREFILL),
        view("p1", Role.PREFILL, outstanding=2),
        view("d0", Role.DECODE, outstanding=1),
        view("d1", Role.DECODE),
    )
)
SCHEDULER = parse_policy(
    {
        "profiles": {
            "default": {
                "slo": {"ttft_ms": 1000, "tpot_ms": 50},
                "decider": {"name": "prompt-length", "min_prompt_tokens": 100},
                "picker": "least-outstanding",
            }
        }
    }
)


def test_long_prompts_split_on_least_loaded_backends() -> None:
    plan = SCHEDULER.schedule(features(prompt_tokens=100), POOL, now=0.0)
    assert (plan.mode, plan.prefill_backend, plan.decode_backend) == (Mode.SPLIT, "p0", "d1")


def test_short_prompts_are_colocated_on_a_decode_backend() -> None:
    plan = SCHEDULER.schedule(features(prompt_tokens=99), POOL, now=0.0)
    assert (plan.mode, plan.prefill_backend, plan.decode_backend) == (Mode.COLOCATED, "d1", "d1")


def test_the_request_overrides_the_decider() -> None:
    assert SCHEDULER.schedule(features(5, Disaggregation.SPLIT), POOL, 0.0).mode is Mode.SPLIT
    assert (
        SCHEDULER.schedule(features(500, Disaggregation.COLOCATED), POOL, 0.0).mode
        is Mode.COLOCATED
    )


def test_ties_rotate_with_arrival_order() -> None:
    pool = PoolSnapshot((view("a", Role.BOTH), view("b", Role.BOTH)))
    picks = [SCHEDULER.schedule(features(sequence=i), pool, 0.0).decode_backend for i in range(4)]
    assert picks == ["a", "b", "a", "b"]


def test_split_uses_two_devices_when_it_can() -> None:
    pool = PoolSnapshot((view("a", Role.BOTH), view("b", Role.BOTH, outstanding=5)))
    plan = SCHEDULER.schedule(features(500), pool, 0.0)
    assert (plan.prefill_backend, plan.decode_backend) == ("a", "b")


def test_unhealthy_and_other_model_backends_are_ignored() -> None:
    pool = PoolSnapshot(
        (
            view("p0", Role.PREFILL, healthy=False),
            view("d0", Role.DECODE),
            view("x", Role.BOTH, model="other"),
        )
    )
    plan = SCHEDULER.schedule(features(500), pool, 0.0)
    assert plan.mode is Mode.COLOCATED
    assert plan.decode_backend == "d0"


def test_explicit_split_without_prefill_backends_is_unavailable() -> None:
    pool = PoolSnapshot((view("d0", Role.DECODE),))
    with pytest.raises(NoHealthyBackendError, match="0 healthy prefill and 1 healthy decode"):
        SCHEDULER.schedule(features(mode=Disaggregation.SPLIT), pool, 0.0)


def test_unknown_model_has_no_backend() -> None:
    with pytest.raises(NoHealthyBackendError, match="no healthy backend serves model 'zz'"):
        SCHEDULER.schedule(features(model="zz"), POOL, 0.0)


def test_settings_override_every_profile_of_the_policy_file() -> None:
    scheduler = build_scheduler(Settings(decider="prompt-length", split_min_prompt_tokens=7))
    assert scheduler.slo_classes == {"default", "batch"}
    for profile in scheduler.profiles.values():
        assert isinstance(profile.decider, PromptLengthDecider)
        assert profile.decider.min_prompt_tokens == 7
    picked = build_scheduler(Settings(picker="least-outstanding"))
    assert isinstance(picked.profiles["batch"].picker, LeastOutstandingPicker)
    with pytest.raises(ConfigError, match="unknown picker 'nope'"):
        build_scheduler(Settings(picker="nope"))


def test_splits_pair_only_backends_that_can_hand_kv_to_each_other() -> None:
    none = frozenset({HandoffMode.NONE})
    pool = PoolSnapshot(
        (
            BackendView("api", "openai", "h:1", Role.BOTH, "m", "", True, 0, handoff=none),
            BackendView("v-p", "vllm", "h:2", Role.PREFILL, "m", "", True, 0),
            BackendView("mock-d", "mock", "h:3", Role.DECODE, "m", "", True, 0),
            BackendView("v-d", "vllm", "h:4", Role.DECODE, "m", "", True, 5),
        )
    )
    for sequence in range(4):
        plan = SCHEDULER.schedule(features(500, sequence=sequence), pool, 0.0)
        assert (plan.prefill_backend, plan.decode_backend) == ("v-p", "v-d")


def test_a_colocated_only_backend_never_splits() -> None:
    none = frozenset({HandoffMode.NONE})
    pool = PoolSnapshot(
        (BackendView("api", "openai", "h:1", Role.BOTH, "m", "", True, 0, handoff=none),)
    )
    assert SCHEDULER.schedule(features(500), pool, 0.0).mode is Mode.COLOCATED
    with pytest.raises(NoHealthyBackendError):
        SCHEDULER.schedule(features(mode=Disaggregation.SPLIT), pool, 0.0)


def test_splits_pair_only_backends_whose_kv_can_move() -> None:
    f32 = (2, 4, 16, "float32")
    bf16 = (2, 4, 16, "bfloat16")
    pool = PoolSnapshot(
        (
            BackendView("p", "mock", "h:1", Role.PREFILL, "m", "", True, 0, kv_shape=f32),
            BackendView("d-bf16", "mock", "h:2", Role.DECODE, "m", "", True, 0, kv_shape=bf16),
            BackendView("d-f32", "mock", "h:3", Role.DECODE, "m", "", True, 9, kv_shape=f32),
        )
    )
    for sequence in range(3):
        plan = SCHEDULER.schedule(features(500, sequence=sequence), pool, 0.0)
        assert (plan.mode, plan.decode_backend) == (Mode.SPLIT, "d-f32")
    only_bf16 = PoolSnapshot(pool.backends[:2])
    assert SCHEDULER.schedule(features(500), only_bf16, 0.0).mode is Mode.COLOCATED
