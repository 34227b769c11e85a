"""Candidate lists carried from one snapshot to the next: the same decisions as working
them out afresh.

A pool that changes at every decision (each request moves a backend's load) keeps its
roster, so the candidate lists of a leg are worked out once; any other change starts
afresh. ``PlainSnapshot`` below is the straightforward reference: every list built from
the backends by comprehension at every call, as a snapshot did before rosters.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TypedDict

import pytest

from backends.base import HandoffMode, Role
from backends.errors import ServingError
from router.errors import InvalidRequestError
from router.scheduling.perf import perf_for
from router.scheduling.plan import Disaggregation, Plan, RequestFeatures
from router.scheduling.prefix import PrefixIndex
from router.scheduling.registry import load_policy, parse_policy
from router.scheduling.scheduler import Scheduler
from router.scheduling.snapshot import BackendView, Candidates, PoolSnapshot

MODELS = ("llama-3.1-8b", "llama-3.1-70b")
SHAPES = ((32, 8, 128, "bfloat16"), (80, 8, 128, "bfloat16"), None)
HANDOFFS = (
    frozenset({HandoffMode.SEQUENTIAL}),
    frozenset({HandoffMode.SEQUENTIAL, HandoffMode.RELAY}),
    frozenset({HandoffMode.RELAY}),
    frozenset({HandoffMode.NONE}),
)


class PlainSnapshot(PoolSnapshot):
    """Candidate lists as tuples, worked out from the backends at every call."""

    def split_candidates(self, model: str) -> tuple[Candidates, Candidates]:
        serving = self.serving(model)
        decode = tuple(b for b in serving if b.role.can_decode() and b.split_keys)
        accepted = frozenset().union(*(d.split_keys for d in decode))
        prefill = tuple(
            b for b in serving if b.role.can_prefill() and not b.split_keys.isdisjoint(accepted)
        )
        return prefill, decode  # type: ignore[return-value]  # tuples, as before rosters

    def colocated_candidates(self, model: str) -> Candidates:
        both = tuple(b for b in self.serving(model) if b.role is Role.BOTH)
        return both or tuple(b for b in self.serving(model) if b.role is Role.DECODE)  # type: ignore[return-value]  # a tuple, as before rosters

    def decode_partners(self, prefill: BackendView, decode: Candidates) -> Candidates:
        compatible = tuple(d for d in decode if prefill.can_hand_off_to(d))
        others = tuple(d for d in compatible if d.id != prefill.id)
        return others or compatible  # type: ignore[return-value]  # a tuple, as before


def random_view(rng: random.Random, index: int) -> BackendView:
    profile = rng.choice(("h100", "groq-lpu", "b200", None))
    model = rng.choice(MODELS)
    return BackendView(
        id=f"b{index}",
        kind=rng.choice(("mock", "mock", "vllm")),
        address=f"127.0.0.1:{20000 + index}",
        role=rng.choice(tuple(Role)),
        model=model,
        profile=profile or "",
        healthy=rng.random() > 0.1,
        outstanding=rng.randrange(0, 20),
        handoff=rng.choice(HANDOFFS),
        wants_relay=rng.random() < 0.2,
        kv_shape=rng.choice(SHAPES),
        kv_tokens_capacity=rng.choice((0, 0, 3000, 200_000)),
        perf=perf_for(profile, model) if profile else None,
        **random_load(rng),
    )


class Load(TypedDict):
    queued_prefill_tokens: int
    running: int
    context_tokens: int
    kv_tokens_used: int


def random_load(rng: random.Random) -> Load:
    running = rng.randrange(0, 40)
    return {
        "queued_prefill_tokens": rng.choice((0, rng.randrange(0, 20000))),
        "running": running,
        "context_tokens": running * rng.randrange(100, 3000),
        "kv_tokens_used": rng.randrange(0, 100_000),
    }


def changed(rng: random.Random, view: BackendView) -> BackendView:
    """Mostly a new load (the roster holds), sometimes a change of roster."""
    roll = rng.random()
    if roll < 0.03:
        return dataclasses.replace(view, healthy=not view.healthy)
    if roll < 0.05:
        return dataclasses.replace(view, role=rng.choice(tuple(Role)))
    if roll < 0.06:
        return dataclasses.replace(view, kv_tokens_capacity=rng.choice((0, 3000, 500_000)))
    if roll < 0.07:
        return dataclasses.replace(view, handoff=rng.choice(HANDOFFS))
    load = random_load(rng)
    return view.with_load(outstanding=rng.randrange(0, 20), **load)


DISAGGREGATIONS = (
    Disaggregation.AUTO,
    Disaggregation.AUTO,
    Disaggregation.SPLIT,
    Disaggregation.COLOCATED,
)


def request(rng: random.Random, sequence: int, index: PrefixIndex) -> RequestFeatures:
    prompt = rng.choice((20, 700, 2500, 9000))
    blocks = prompt // 64
    shared = rng.random() < 0.5
    start = 1000 * rng.randrange(4)
    hashes = tuple(range(start, start + blocks)) if shared else ()
    return RequestFeatures(
        request_id=str(sequence),
        model=rng.choice(MODELS),
        prompt_tokens=prompt,
        max_tokens=rng.choice((1, 64, 600, 150_000)),
        disaggregation=rng.choice(DISAGGREGATIONS),
        sequence=sequence,
        slo_class=rng.choice(("default", "batch")),
        prefix_hashes=hashes,
    )


def decision(scheduler: Scheduler, features: RequestFeatures, snapshot: PoolSnapshot) -> object:
    """The plan, or the refusal as its type and message."""
    try:
        plan: Plan = scheduler.schedule(features, snapshot, 3.0)
    except (ServingError, InvalidRequestError) as error:
        return (type(error).__name__, str(error))
    return plan


SCHEDULERS = {
    # The packaged policy: 4 sampled candidates per leg plus prefix holders; a cost
    # profile with power-of-two choices.
    "packaged": load_policy(),
    # Every candidate scored, and a picker that reads the whole list.
    "exhaustive": parse_policy(
        {
            "profiles": {
                "default": {
                    "slo": {"ttft_ms": 500, "tpot_ms": 30},
                    "decider": "cost-model",
                    "filters": ["kv-fits"],
                    "scorers": ["prefix-affinity", "predicted-latency", "kv-utilization"],
                    "picker": "max-score",
                },
                "batch": {
                    "slo": {"ttft_ms": 5000, "tpot_ms": 100},
                    "decider": "always",
                    "filters": ["kv-fits"],
                    "picker": "least-outstanding",
                },
            }
        }
    ),
}


@pytest.mark.parametrize("policy", sorted(SCHEDULERS))
@pytest.mark.parametrize("seed", range(4))
def test_a_pool_that_keeps_its_roster_decides_as_one_worked_out_afresh(
    policy: str, seed: int
) -> None:
    rng = random.Random(seed)
    scheduler = SCHEDULERS[policy]
    index = PrefixIndex()
    backends = [random_view(rng, i) for i in range(rng.randrange(8, 40))]
    for k in range(4):  # each shared prefix held by a few backends, some only in part
        for holder in rng.sample(backends, 3):
            index.record(holder.id, range(1000 * k, 1000 * k + rng.randrange(1, 60)))
    snapshot = PoolSnapshot(tuple(backends), index)
    decided = kept = 0
    for step in range(150):
        positions = rng.sample(range(len(backends)), rng.randrange(1, 4))
        before = snapshot
        snapshot = snapshot.replaced((p, changed(rng, snapshot.backends[p])) for p in positions)
        kept += snapshot._roster is before._roster
        plain = PlainSnapshot(snapshot.backends, index)
        for _ in range(3):
            features = request(rng, step, index)
            expected = decision(scheduler, features, plain)
            assert decision(scheduler, features, snapshot) == expected
            decided += isinstance(expected, Plan)
    assert decided > 100
    assert 50 < kept < 150  # the roster mostly holds, and is sometimes started afresh


@pytest.mark.parametrize("seed", range(3))
def test_carried_candidate_lists_equal_the_plain_ones(seed: int) -> None:
    rng = random.Random(seed)
    backends = [random_view(rng, i) for i in range(30)]
    snapshot = PoolSnapshot(tuple(backends))
    for _ in range(100):
        positions = rng.sample(range(len(backends)), 2)
        snapshot = snapshot.replaced((p, changed(rng, snapshot.backends[p])) for p in positions)
        plain = PlainSnapshot(snapshot.backends)
        for model in MODELS:
            prefill, decode = snapshot.split_candidates(model)
            plain_prefill, plain_decode = plain.split_candidates(model)
            assert tuple(prefill) == tuple(plain_prefill)
            assert tuple(decode) == tuple(plain_decode)
            assert prefill[1:3] == tuple(plain_prefill)[1:3]
            colocated = snapshot.colocated_candidates(model)
            assert tuple(colocated) == tuple(plain.colocated_candidates(model))
            for backend in prefill:
                partners = snapshot.decode_partners(backend, decode)
                assert tuple(partners) == tuple(plain.decode_partners(backend, plain_decode))
                known = [d.kv_capacity for d in partners if d.kv_capacity]
                assert snapshot.min_kv_capacity(partners) == min(known, default=0)
            wanted = {b.id for b in rng.sample(backends, 5)}
            assert decode.holding(wanted) == [d for d in plain_decode if d.id in wanted]


def test_a_load_copy_is_the_view_the_constructor_makes() -> None:
    rng = random.Random(5)
    for i in range(50):
        view = random_view(rng, i)
        load = random_load(rng)
        copied = view.with_load(outstanding=7, **load)
        built = dataclasses.replace(view, outstanding=7, **load)
        assert copied == built
        assert copied.__dict__ == built.__dict__  # derived figures included
        assert copied.split_keys is view.split_keys
