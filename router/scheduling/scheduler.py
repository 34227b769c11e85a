"""Runs a policy profile: filters, scorers and a picker per leg, a decider, admission.

One profile per SLO class (the request's ``slo_class``); each names its plugins by
their registered names (router/scheduling/registry.py) and is read from the policy file.
Everything here is pure: the same request, snapshot and time give the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backends.errors import ServingError
from router.errors import InvalidRequestError, NoHealthyBackendError
from router.scheduling import predict
from router.scheduling.admission import Admission
from router.scheduling.context import Context
from router.scheduling.deciders import Decider, decided
from router.scheduling.filters import Filter
from router.scheduling.legs import Leg
from router.scheduling.pickers import Picker, mix
from router.scheduling.plan import Disaggregation, Mode, Plan, Reason, RequestFeatures
from router.scheduling.scorers import Scorer
from router.scheduling.service_level import DEFAULT_SLO_CLASS
from router.scheduling.slo import Slo
from router.scheduling.snapshot import BackendView, Candidates, PoolSnapshot


@dataclass(frozen=True)
class Profile:
    """The policy of one SLO class."""

    name: str
    slo: Slo
    decider: Decider
    picker: Picker
    admission: Admission
    filters: tuple[Filter, ...] = ()
    scorers: tuple[tuple[Scorer, float], ...] = ()
    # Fixed cost of a split beyond the KV's wire time (router hop, handle exchange).
    split_overhead_s: float = 0.001
    # Score at most this many candidates per leg (0: all): a window at a position drawn
    # from the arrival sequence, plus every backend holding part of the prompt's prefix.
    # Sampling keeps a decision's cost flat in the pool size while staying close to the
    # best (the power of d choices); prefix holders are never sampled away.
    sample: int = 0


class Scheduler:
    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        if DEFAULT_SLO_CLASS not in profiles:
            raise ValueError(f"a policy needs a profile named {DEFAULT_SLO_CLASS!r}")
        self.profiles = dict(profiles)
        self.slo_classes = frozenset(self.profiles)

    def default_slo(self, slo_class: str = DEFAULT_SLO_CLASS) -> Slo:
        return self.profiles[slo_class].slo

    def schedule(
        self, features: RequestFeatures, snapshot: PoolSnapshot, now: float, *, admit: bool = True
    ) -> Plan:
        """The plan for ``features``; raises NoHealthyBackendError when no backend can take
        it, OverloadedError when admission sheds it, InvalidRequestError for an unknown
        SLO class. ``admit=False`` skips admission: a request already admitted, tried
        again after a failure, is not shed half-served."""
        profile = self.profiles.get(features.slo_class)
        if profile is None:
            raise InvalidRequestError(
                f"unknown slo_class {features.slo_class!r}; "
                f"known: {', '.join(sorted(self.slo_classes))}"
            )
        ctx = Context(
            features, snapshot, now, features.slo or profile.slo, profile.split_overhead_s
        )
        built: dict[Mode, Plan | None] = {}

        def build(mode: Mode) -> Plan | None:
            if mode not in built:
                built[mode] = self._build(mode, profile, ctx)
            return built[mode]

        wanted = features.disaggregation
        if wanted is Disaggregation.SPLIT:
            plan = build(Mode.SPLIT)
            plan = decided(plan, Reason.REQUESTED, split=plan)
        elif wanted is Disaggregation.COLOCATED:
            plan = build(Mode.COLOCATED)
            plan = decided(plan, Reason.REQUESTED, colocated=plan)
        else:
            plan = profile.decider.choose(ctx, build)
        if plan is None:
            raise self._unservable(wanted, features, snapshot)
        if admit:
            profile.admission.admit(plan, ctx)
        return plan

    # -- building a plan for one mode ---------------------------------------------

    def _build(self, mode: Mode, profile: Profile, ctx: Context) -> Plan | None:
        model = ctx.features.model
        if mode is Mode.COLOCATED:
            candidates = self._filter(
                ctx.snapshot.colocated_candidates(model), Leg.COLOCATED, profile, ctx
            )
            if not candidates:
                return None
            backend = self._pick(candidates, Leg.COLOCATED, profile, ctx)
            return Plan(
                Mode.COLOCATED, backend.id, backend.id, predicted=predict.colocated(backend, ctx)
            )
        all_prefill, all_decode = ctx.snapshot.split_candidates(model)
        prefill = self._filter(all_prefill, Leg.PREFILL, profile, ctx)
        decode = self._filter(all_decode, Leg.DECODE, profile, ctx)
        if not prefill or not decode:
            return None
        prefill_backend = self._pick(prefill, Leg.PREFILL, profile, ctx)
        if decode is all_decode:
            partners: Sequence[BackendView] = ctx.snapshot.decode_partners(
                prefill_backend, all_decode
            )
        else:
            compatible = [d for d in decode if prefill_backend.can_hand_off_to(d)]
            partners = [d for d in compatible if d.id != prefill_backend.id] or compatible
        if not partners:
            return None
        decode_backend = self._pick(partners, Leg.DECODE, profile, ctx)
        return Plan(
            Mode.SPLIT,
            prefill_backend.id,
            decode_backend.id,
            prefill_backend.relays_with(decode_backend),
            predict.split(prefill_backend, decode_backend, ctx),
        )

    @staticmethod
    def _filter(
        candidates: Sequence[BackendView], leg: Leg, profile: Profile, ctx: Context
    ) -> Sequence[BackendView]:
        for kept in profile.filters:
            candidates = kept.apply(candidates, leg, ctx)
        return candidates

    @staticmethod
    def _pick(
        candidates: Sequence[BackendView], leg: Leg, profile: Profile, ctx: Context
    ) -> BackendView:
        scorers = profile.scorers
        sample = profile.sample
        if sample and len(candidates) > sample:
            candidates = _shortlist(candidates, sample, ctx)

        def rate(subset: Sequence[BackendView]) -> list[float]:
            totals = [0.0] * len(subset)
            for scorer, weight in scorers:
                scores = scorer.scores(subset, leg, ctx)
                totals = [t + weight * s for t, s in zip(totals, scores, strict=True)]
            return totals

        return profile.picker.pick(candidates, ctx.features.sequence, rate)

    @staticmethod
    def _unservable(
        wanted: Disaggregation, features: RequestFeatures, snapshot: PoolSnapshot
    ) -> ServingError:
        model = features.model
        if not snapshot.serving(model):
            return NoHealthyBackendError(f"no healthy backend serves model {model!r}")
        prefill, decode = snapshot.split_candidates(model)
        colocated = snapshot.colocated_candidates(model)
        if wanted is Disaggregation.SPLIT and not (prefill and decode):
            return NoHealthyBackendError(
                f"split requested but model {model!r} has {len(prefill)} healthy prefill "
                f"and {len(decode)} healthy decode backends"
            )
        if wanted is Disaggregation.COLOCATED and not colocated:
            return NoHealthyBackendError(
                f"colocated requested but model {model!r} has no healthy decode or both backend"
            )
        # Backends exist, and filters left none: the request is larger than any of them.
        needed = features.prompt_tokens + features.max_tokens
        largest = max((b.kv_capacity for b in (*decode, *colocated)), default=0)
        if largest and needed > largest:
            return InvalidRequestError(
                f"the request needs {needed} KV tokens (prompt {features.prompt_tokens} + "
                f"max_tokens {features.max_tokens}) but the largest backend of model "
                f"{model!r} holds {largest}; lower max_tokens or shorten the prompt"
            )
        return NoHealthyBackendError(f"no healthy backend of model {model!r} can take it now")


# Beyond this many candidates, the prefix holders among them are looked up by id rather
# than found by going through them all.
_SCAN_LIMIT = 64


def _shortlist(
    candidates: Sequence[BackendView], sample: int, ctx: Context
) -> Sequence[BackendView]:
    count = len(candidates)
    start = mix(ctx.features.sequence) % count
    end = start + sample
    window = list(candidates[start:end])
    if end > count:
        window += candidates[: end - count]
    matched = ctx.matched_blocks
    if matched:
        chosen = {c.id for c in window}
        if isinstance(candidates, Candidates) and count > _SCAN_LIMIT:  # look the holders up
            window += [c for c in candidates.holding(matched) if c.id not in chosen]
        else:
            window += [c for c in candidates if c.id in matched and c.id not in chosen]
    return window
