"""Deciders: split a request between two backends, or serve it on one.

A decider is asked only for requests that leave the choice to the router
(``Disaggregation.AUTO``). It gets ``build``, which picks backends for a mode and
returns that plan with its prediction, or None when the mode has no backends, and
returns the plan it prefers. Whatever it prefers, a mode without backends falls back to
the other, so a pool of colocated backends still serves a decider that likes splitting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

from router.scheduling.context import Context
from router.scheduling.plan import Mode, Plan, Prediction
from router.scheduling.slo import Slo

Build = Callable[[Mode], Plan | None]


class Decider(Protocol):
    name: ClassVar[str]

    def choose(self, ctx: Context, build: Build) -> Plan | None: ...


def _other(mode: Mode) -> Mode:
    return Mode.COLOCATED if mode is Mode.SPLIT else Mode.SPLIT


def preferring(mode: Mode, build: Build) -> Plan | None:
    return build(mode) or build(_other(mode))


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
        return preferring(Mode.SPLIT if long else Mode.COLOCATED, build)


def lateness(predicted: Prediction, slo: Slo) -> float:
    """How far past its SLO a prediction is, as the worse of the two ratios (<= 1: met).

    A limit the SLO leaves unset is never late.
    """
    return max(_share(predicted.ttft_s, slo.ttft_s), _share(predicted.tpot_s, slo.tpot_s))


def _share(predicted_s: float, limit_s: float | None) -> float:
    return 0.0 if limit_s is None else predicted_s / limit_s


class CostModelDecider:
    """Predicts both modes and takes the cheaper one that meets the request's SLO.

    Splitting buys a prefill on a compute device and a decode batch free of prefill
    stalls, at the price of a KV transfer (over the slower link) and a second device.
    A prefix cached on the colocated backend, a short prompt or a slow link make
    colocation cheaper or the only one on time. A split must be ``split_margin`` cheaper
    to win over a colocation that is also on time. When neither mode meets the SLO it
    takes the less late one; when the pool has no performance model for a backend it falls
    back to the prompt-length rule.
    """

    name: ClassVar[str] = "cost-model"

    def __init__(self, min_prompt_tokens: int = 512, split_margin: float = 0.1) -> None:
        if split_margin < 0:
            raise ValueError(f"split_margin must be >= 0, got {split_margin}")
        self.fallback = PromptLengthDecider(min_prompt_tokens)
        # When both modes are on time, a split must be this much cheaper to be worth a
        # second device and a KV transfer: the model's error should not flip the mode.
        self.split_margin = split_margin

    def choose(self, ctx: Context, build: Build) -> Plan | None:
        split = build(Mode.SPLIT)
        colocated = build(Mode.COLOCATED)
        if split is None or colocated is None:
            return split or colocated
        s, c = split.predicted, colocated.predicted
        if s is None or c is None:
            return self.fallback.choose(ctx, lambda m: split if m is Mode.SPLIT else colocated)
        slo = ctx.slo
        s_late, c_late = lateness(s, slo), lateness(c, slo)
        if s_late <= 1.0 and c_late <= 1.0:
            return split if s.cost_usd < c.cost_usd * (1.0 - self.split_margin) else colocated
        if s_late <= 1.0 or c_late <= 1.0:
            return split if s_late <= 1.0 else colocated
        return split if s_late < c_late else colocated
