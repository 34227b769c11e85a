"""The split decision: marginal costs (device time priced by load), and the reason and
predictions every plan carries."""

from __future__ import annotations

from typing import Any

import pytest

from backends.base import Role
from router.scheduling.context import Context
from router.scheduling.plan import Disaggregation, Mode, Reason
from router.scheduling.slo import Slo
from router.scheduling.snapshot import PoolSnapshot
from tests.unit.test_policies import H100, policy, request, split_pool, view

SLO = Slo(ttft_s=2.0, tpot_s=0.1)  # the profile of test_policies.policy


def load_of(backend: Any, prompt: int = 1000, output: int = 200) -> float:
    ctx = Context(request(prompt, output), PoolSnapshot((backend,)), 0.0, SLO)
    return ctx.load(backend)


def test_an_idle_device_has_no_load_and_a_full_one_all() -> None:
    assert load_of(view("p", Role.PREFILL)) == 0.0
    assert H100 is not None
    full = view("d", Role.DECODE, kv_tokens_used=H100.kv_capacity_tokens)
    assert load_of(full) == 1.0
    assert load_of(view("p", Role.PREFILL, perf=None)) == 1.0  # no model: counted full


def test_load_grows_with_the_prefill_queue_and_the_decode_batch() -> None:
    queues = [load_of(view("p", Role.PREFILL, queued_prefill_tokens=q)) for q in (0, 2000, 20000)]
    assert queues == sorted(queues)
    assert queues[0] < queues[1] < queues[2] <= 1.0
    batches = [
        load_of(view("d", Role.DECODE, running=r, context_tokens=r * 2000)) for r in (0, 8, 64)
    ]
    assert batches[0] < batches[1] < batches[2]
    # An idle decode device's own step, against the 100 ms TPOT target, is its floor.
    assert H100 is not None
    assert batches[0] == pytest.approx(H100.step_s(1, 1100) / 0.1)


def test_an_idle_prefill_device_makes_the_split_cheaper_at_the_margin() -> None:
    # A decode device with a batch: a colocated prefill there stalls its 8 sequences,
    # a split's prefill takes a device with nothing else to do. In list prices both
    # cost the same (the same hardware), and the colocation wins the margin.
    marginal = policy(decider="cost-model").schedule(request(1000, 200), split_pool(), 0.0)
    listed = policy(decider={"name": "cost-model", "marginal": False}).schedule(
        request(1000, 200), split_pool(), 0.0
    )
    assert (marginal.mode, listed.mode) == (Mode.SPLIT, Mode.COLOCATED)
    for plan in (marginal, listed):
        assert plan.decision is not None
        assert plan.decision.reason is Reason.CHEAPER
    decision = marginal.decision
    assert decision is not None
    assert decision.split is not None
    assert decision.colocated is not None
    assert decision.split.cost_usd == pytest.approx(decision.colocated.cost_usd)
    assert decision.split.marginal_usd < 0.9 * decision.colocated.marginal_usd
    assert decision.split.prefill_load == 0.0 < decision.colocated.prefill_load


def test_a_queue_near_the_ttft_target_prices_the_prefill_device_up() -> None:
    pool = PoolSnapshot(
        (view("p", Role.PREFILL, queued_prefill_tokens=20000), view("d", Role.DECODE))
    )
    plan = policy(decider="cost-model").schedule(request(1000, 200), pool, 0.0)
    assert plan.mode is Mode.COLOCATED
    assert plan.decision is not None
    assert plan.decision.split is not None
    assert plan.decision.split.prefill_load > 0.9


def reason(plan: Any) -> tuple[Mode, Reason]:
    assert plan.decision is not None
    return plan.mode, plan.decision.reason


def test_every_plan_says_why_it_has_its_mode() -> None:
    pool = split_pool()
    features = request(1000, 200)
    assert reason(policy(decider="always").schedule(features, pool, 0.0)) == (
        Mode.SPLIT,
        Reason.POLICY,
    )
    asked = request(1000, 200, mode=Disaggregation.COLOCATED)
    assert reason(policy().schedule(asked, pool, 0.0)) == (Mode.COLOCATED, Reason.REQUESTED)
    alone = PoolSnapshot((view("d", Role.DECODE),))  # nothing can prefill for a split
    assert reason(policy().schedule(features, alone, 0.0)) == (Mode.COLOCATED, Reason.ONLY_MODE)
    assert reason(policy(decider="always").schedule(features, alone, 0.0)) == (
        Mode.COLOCATED,
        Reason.ONLY_MODE,
    )
    unmodelled = PoolSnapshot((view("p", Role.PREFILL, perf=None), view("d", Role.DECODE)))
    assert reason(policy().schedule(features, unmodelled, 0.0)) == (
        Mode.SPLIT,
        Reason.PROMPT_LENGTH,
    )
    # A first token within a second: the decode device's queued prefills take longer.
    busy = split_pool(busy=60000)
    fast = request(1000, 200, slo=Slo(ttft_s=1.0, tpot_s=0.1))
    assert reason(policy().schedule(fast, busy, 0.0)) == (Mode.SPLIT, Reason.ON_TIME)
    hopeless = request(1000, 200, slo=Slo(ttft_s=0.001, tpot_s=0.001))
    assert reason(policy().schedule(hopeless, pool, 0.0))[1] is Reason.LESS_LATE


def test_plans_are_equal_whatever_their_reason() -> None:
    auto = policy().schedule(request(), split_pool(), 0.0)
    forced = policy(decider="always").schedule(request(), split_pool(), 0.0)
    assert auto.mode is forced.mode is Mode.SPLIT
    assert reason(auto) != reason(forced)
    assert auto == forced
