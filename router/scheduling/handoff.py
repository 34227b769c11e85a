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
    SERVE_COLOCATED = "serve-colocated"  # served again by the decode backend alone
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


def after_failed_leg(*, retryable: bool, client_has_tokens: bool) -> NextStep:
    """The step after a split's prefill or decode leg failed.

    Once the client has a token, serving the request again would repeat it; before
    that, a retryable failure is served colocated on the decode backend (a local
    prefill there).
    """
    if retryable and not client_has_tokens:
        return NextStep.SERVE_COLOCATED
    return NextStep.FAIL
