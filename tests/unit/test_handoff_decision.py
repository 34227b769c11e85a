"""The step after a prefill, or after a failed leg, that the dispatcher and simulator share."""

from __future__ import annotations

import pytest

from router.scheduling.handoff import NextStep, after_failed_leg, after_prefill
from router.scheduling.plan import Mode, Plan

SPLIT = Plan(Mode.SPLIT, "p", "d")
SPLIT_RELAYED = Plan(Mode.SPLIT, "p", "d", relay=True)
COLOCATED = Plan(Mode.COLOCATED, "c", "c")


@pytest.mark.parametrize(
    ("plan", "finished", "layouts_compatible", "step"),
    [
        # The first token was the last: nothing moves, whatever the plan.
        (SPLIT, True, True, NextStep.FINISHED),
        (SPLIT_RELAYED, True, False, NextStep.FINISHED),
        (COLOCATED, True, True, NextStep.FINISHED),
        # One backend does both legs: no handoff, even with layouts that differ.
        (COLOCATED, False, True, NextStep.DECODE_IN_PLACE),
        (COLOCATED, False, False, NextStep.DECODE_IN_PLACE),
        (Plan(Mode.COLOCATED, "c", "c", relay=True), False, True, NextStep.DECODE_IN_PLACE),
        # A split pulls unless a relay is asked for or the layouts differ.
        (SPLIT, False, True, NextStep.DECODE_PULLS),
        (SPLIT_RELAYED, False, True, NextStep.RELAY_THEN_DECODE),
        (SPLIT, False, False, NextStep.RELAY_THEN_DECODE),
        (SPLIT_RELAYED, False, False, NextStep.RELAY_THEN_DECODE),
    ],
)
def test_after_prefill(
    plan: Plan, finished: bool, layouts_compatible: bool, step: NextStep
) -> None:
    assert after_prefill(plan, finished=finished, layouts_compatible=layouts_compatible) is step


@pytest.mark.parametrize(
    ("retryable", "client_has_tokens", "handoff", "attempts_left", "migration", "step"),
    [
        (True, False, False, True, True, NextStep.RETRY),
        (True, False, True, True, True, NextStep.SERVE_COLOCATED),
        # A restart would send the client tokens it already has: resume after them.
        (True, True, False, True, True, NextStep.RESUME),
        (True, True, True, True, True, NextStep.RESUME),
        (True, True, False, True, False, NextStep.FAIL),
        # Before a token, migration does not matter.
        (True, False, False, True, False, NextStep.RETRY),
        (True, False, False, False, True, NextStep.FAIL),
        (True, True, False, False, True, NextStep.FAIL),
        (False, False, False, True, True, NextStep.FAIL),
        (False, True, False, True, True, NextStep.FAIL),
    ],
)
def test_after_failed_leg(  # noqa: PLR0917  # one parameter per column of the table
    retryable: bool,
    client_has_tokens: bool,
    handoff: bool,
    attempts_left: bool,
    migration: bool,
    step: NextStep,
) -> None:
    assert (
        after_failed_leg(
            retryable=retryable,
            client_has_tokens=client_has_tokens,
            handoff=handoff,
            attempts_left=attempts_left,
            migration=migration,
        )
        is step
    )
