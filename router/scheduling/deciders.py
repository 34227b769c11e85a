"""Deciders: split a request between two backends, or serve it on one.

A decider is asked only for requests that leave the choice to the router
(``Disaggregation.AUTO``). It gets ``build``, which picks backends for a mode and
returns that plan with its prediction, or None when the mode has no backends, and
returns the plan it prefers, with the :class:`Decision` that says why. Whatever it
prefers, a mode without backends falls back to the other, so a pool of colocated backends
still serves a decider that likes splitting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

from router.scheduling.context import Context
from router.scheduling.plan import Decision, Mode, Plan, Prediction, Reason
from router.scheduling.slo import Slo

Build = Callable[[Mode], Plan | None]


class Decider(Protocol):
    name: ClassVar[str]

    def choose(self, ctx: Context, build: Build) -> Plan | None: ...


def _other(mode: Mode) -> Mode:
    return Mode.COLOCATED if mode is Mode.SPLIT else Mode.SPLIT


def decided(
    plan: Plan | None, reason: Reason, split: Plan | None = None, colocated: Plan | None = None
) -> Plan | None:
    """``plan`` with why it was chosen, and the predictions of the modes that were built."""
    if plan is None:
        return None
    decision = Decision(
        reason,
        None if split is None else split.predicted,
        None if colocated is None else colocated.predicted,
    )
    # Built field by field: dataclasses.replace costs more than the rest of this.
    return Plan(
        plan.mode, plan.prefill_backend, plan.decode_backend, plan.relay, plan.predicted, decision
    )


def preferring(mode: Mode, build: Build, reason: Reason = Reason.POLICY) -> Plan | None:
    """The plan of ``mode``, else of the other (``Reason.ONLY_MODE``)."""
    wanted = build(mode)
    if wanted is not None:
        return decided(wanted, reason, *_pair(wanted))
    other = build(_other(mode))
    return decided(other, Reason.ONLY_MODE, *_pair(other))


def _pair(plan: Plan | None) -> tuple[Plan | None, Plan | None]:
    """(split, colocated) with ``plan`` in its own mode's place."""
    if plan is None:
        return None, None
    return (plan, None) if plan.mode is Mode.SPLIT else (None, plan)


class AlwaysSplitDecider:
    """Split whenever the pool can."""

    name: ClassVar[str] = "always"

    def choose(self, ctx: Context, build: Build) -> Plan | None:
        return preferring(Mode.SPLIT, build)


class NeverSplitDecider:
    """Serve every request on one backend when the pool can."""

    name: ClassVar[str] = "never"

    def choose(self, ctx: Context, build: Build) -> Plan | None:
        return preferring(Mode.COLOCATED, build)


class PromptLengthDecider:
    """Split prompts of at least ``min_prompt_tokens``.

    Short prefills are cheap on the decode device itself, and skipping the KV move
    saves more than a faster prefill gains.
    """

    name: ClassVar[str] = "prompt-length"

    def __init__(self, min_prompt_tokens: int = 512) -> None:
        if min_prompt_tokens < 0:
            raise ValueError(f"min_prompt_tokens must be >= 0, got {min_prompt_tokens}")
        self.min_prompt_tokens = min_prompt_tokens

    def choose(self, ctx: Context, build: Build) -> Plan | None:
        long = ctx.features.prompt_tokens >= self.min_prompt_tokens
        return preferring(Mode.SPLIT if long else Mode.COLOCATED, build, Reason.PROMPT_LENGTH)


def lateness(predicted: Prediction, slo: Slo) -> float:
    """How far past its SLO a prediction is, as the worse of the two ratios (<= 1: met).

    A limit the SLO leaves unset is never late.
    """
    return max(_share(predicted.ttft_s, slo.ttft_s), _share(predicted.tpot_s, slo.tpot_s))


def _share(predicted_s: float, limit_s: float | None) -> float:
    return 0.0 if limit_s is None else predicted_s / limit_s


class CostModelDecider:
    """Predicts both modes and takes the one on time that takes least from the rest.

    Splitting buys a prefill on a compute device and a decode batch free of prefill
    stalls, at the price of a KV transfer (over the slower link) and a second device.
    A prefix cached on the colocated backend, a short prompt or a slow link make
    colocation cheaper or the only one on time. Both modes on time, it compares their
    marginal costs: each device's time at its price times its load, so that a prefill
    device with nothing queued, or a decode device with room in its batch, is nearly
    free, and a device already decoding a batch (whose sequences a prefill there would
    stall) or a queue near the request's TTFT costs its full price. A split must be
    ``split_margin`` cheaper to win: the model's error should not flip the mode. When
    one mode alone is on time it takes that one, when neither the less late; when the
    pool has no performance model for a backend it falls back to the prompt-length rule.

    ``marginal=False`` compares plain costs instead (device time at its price, however
    idle): for devices paid per use, where an idle one costs nothing at all.
    """

    name: ClassVar[str] = "cost-model"

    def __init__(
        self, min_prompt_tokens: int = 512, split_margin: float = 0.1, marginal: bool = True
    ) -> None:
        if split_margin < 0:
            raise ValueError(f"split_margin must be >= 0, got {split_margin}")
        self.fallback = PromptLengthDecider(min_prompt_tokens)
        # When both modes are on time, a split must be this much cheaper to be worth a
        # second device and a KV transfer: the model's error should not flip the mode.
        self.split_margin = split_margin
        self.marginal = marginal

    def choose(self, ctx: Context, build: Build) -> Plan | None:
        split = build(Mode.SPLIT)
        colocated = build(Mode.COLOCATED)
        if split is None or colocated is None:
            return decided(split or colocated, Reason.ONLY_MODE, split, colocated)
        s, c = split.predicted, colocated.predicted
        if s is None or c is None:
            chosen = self.fallback.choose(ctx, lambda m: split if m is Mode.SPLIT else colocated)
            return decided(chosen, Reason.PROMPT_LENGTH, split, colocated)
        slo = ctx.slo
        s_late, c_late = lateness(s, slo), lateness(c, slo)
        if s_late <= 1.0 and c_late <= 1.0:
            if self.marginal:
                s_cost, c_cost = s.marginal_usd, c.marginal_usd
            else:
                s_cost, c_cost = s.cost_usd, c.cost_usd
            cheaper = s_cost < c_cost * (1.0 - self.split_margin)
            return decided(split if cheaper else colocated, Reason.CHEAPER, split, colocated)
        if s_late <= 1.0 or c_late <= 1.0:
            chosen = split if s_late <= 1.0 else colocated
            return decided(chosen, Reason.ON_TIME, split, colocated)
        chosen = split if s_late < c_late else colocated
        return decided(chosen, Reason.LESS_LATE, split, colocated)
