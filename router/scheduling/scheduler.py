"""Turns a decider and a picker into a plan, or a clear reason why there is none."""

from __future__ import annotations

from router.errors import NoHealthyBackendError
from router.pool.snapshot import PoolSnapshot
from router.scheduling.deciders import Decider
from router.scheduling.pickers import Picker
from router.scheduling.plan import Disaggregation, Mode, Plan, RequestFeatures


class Scheduler:
    def __init__(self, decider: Decider, picker: Picker) -> None:
        self.decider = decider
        self.picker = picker

    def schedule(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Plan:
        preferred = self.decider.decide(features, snapshot, now)
        plan = self._plan(preferred, features, snapshot)
        if plan is None and features.disaggregation is Disaggregation.AUTO:
            other = Mode.COLOCATED if preferred is Mode.SPLIT else Mode.SPLIT
            plan = self._plan(other, features, snapshot)
        if plan is None:
            raise NoHealthyBackendError(self._why(preferred, features, snapshot))
        return plan

    def _plan(self, mode: Mode, features: RequestFeatures, snapshot: PoolSnapshot) -> Plan | None:
        model, sequence = features.model, features.sequence
        if mode is Mode.COLOCATED:
            candidates = snapshot.colocated_candidates(model)
            if not candidates:
                return None
            backend = self.picker.pick(candidates, sequence).id
            return Plan(Mode.COLOCATED, backend, backend)
        prefill, decode = snapshot.split_candidates(model)
        if not prefill or not decode:
            return None
        prefill_backend = self.picker.pick(prefill, sequence)
        compatible = [d for d in decode if prefill_backend.can_hand_off_to(d)]
        # Decode elsewhere when there is an elsewhere: splitting onto one device gains nothing.
        others = [d for d in compatible if d.id != prefill_backend.id]
        decode_backend = self.picker.pick(others or compatible, sequence)
        relay = prefill_backend.relays_with(decode_backend)
        return Plan(Mode.SPLIT, prefill_backend.id, decode_backend.id, relay)

    @staticmethod
    def _why(mode: Mode, features: RequestFeatures, snapshot: PoolSnapshot) -> str:
        model = features.model
        if not snapshot.serving(model):
            return f"no healthy backend serves model {model!r}"
        if mode is Mode.SPLIT:
            return (
                f"split requested but model {model!r} has "
                f"{len(snapshot.prefill_candidates(model))} healthy prefill and "
                f"{len(snapshot.decode_candidates(model))} healthy decode backends"
            )
        return f"colocated requested but model {model!r} has no healthy decode or both backend"
