"""What a request does once its prefill has answered, or once one of its legs failed.

A pure rule the dispatcher follows with real backends (router.handoff moves the
bytes) and the simulator with modelled devices, so that both hand KV over alike.
"""

from __future__ import annotations

import enum

from router.scheduling.plan import Mode, Plan


class NextStep(enum.Enum):
    FINISHED = "finished"  # the prefill's first token was the whole answer
    DECODE_IN_PLACE = "decode-in-place"  # colocated: the backend that prefilled decodes on
    DECODE_PULLS = "decode-pulls"  # the decode leg is sent now and fetches the KV itself
    RELAY_THEN_DECODE = "relay-then-decode"  # the router moves the KV, then sends the decode leg
    RETRY = "retry"  # planned again, away from the failed backend: no token reached the client
    RESUME = "resume"  # continued on another backend after the tokens the client has
    SERVE_COLOCATED = "serve-colocated"  # the handoff failed: served by one backend alone
    FAIL = "fail"  # the error reaches the client


def after_prefill(plan: Plan, *, finished: bool, layouts_compatible: bool) -> NextStep:
    """The step after a prefill that succeeded.

    ``layouts_compatible`` is False only when the two backends' KV layouts are both
    known and differ: the decode side can only pull a KV laid out as its own, while a
    relay converts it on the way.
    """
    if finished:
        return NextStep.FINISHED
    if plan.mode is Mode.COLOCATED:
        return NextStep.DECODE_IN_PLACE
    if plan.relay or not layouts_compatible:
        return NextStep.RELAY_THEN_DECODE
    return NextStep.DECODE_PULLS


def after_failed_leg(
    *,
    retryable: bool,
    client_has_tokens: bool,
    handoff: bool = False,
    attempts_left: bool = True,
    migration: bool = True,
) -> NextStep:
    """The step after a leg failed (the dispatcher then checks the retry budget and
    that another backend can take it).

    A failure that any backend would repeat (bad input) fails. Otherwise, within the
    attempts: a stalled KV handoff between two working backends is served by one
    alone; before any token reached the client the request is simply planned again,
    away from the failed backend; after tokens it resumes elsewhere from them, so
    that none is lost or repeated, unless migration is off.
    """
    if not retryable or not attempts_left:
        return NextStep.FAIL
    if client_has_tokens:
        return NextStep.RESUME if migration else NextStep.FAIL
    return NextStep.SERVE_COLOCATED if handoff else NextStep.RETRY
