"""What one decision knows: the request, the pool at that instant, the time, its SLO."""

from __future__ import annotations

from collections.abc import Mapping

from backends.base import Role
from router.scheduling.plan import RequestFeatures
from router.scheduling.slo import Slo
from router.scheduling.snapshot import BackendView, PoolSnapshot

_NO_MATCHES: Mapping[str, int] = {}


class Context:
    """Built once per decision and shared by every plugin; nothing in it outlives the call."""

    __slots__ = (
        "_idle_step",
        "_load",
        "_prefill",
        "_prefill_by_view",
        "_step",
        "features",
        "matched_blocks",
        "now",
        "slo",
        "snapshot",
        "split_overhead_s",
    )

    def __init__(
        self,
        features: RequestFeatures,
        snapshot: PoolSnapshot,
        now: float,
        slo: Slo,
        split_overhead_s: float = 0.0,
    ) -> None:
        self.features = features
        self.snapshot = snapshot
        self.now = now
        self.slo = slo
        # Fixed cost of a split beyond the KV wire time (router hop, handle exchange), s.
        self.split_overhead_s = split_overhead_s
        index = snapshot.prefix_index
        hashes = features.prefix_hashes
        # Leading prompt blocks each backend holds (backends holding none are absent).
        self.matched_blocks: Mapping[str, int] = (
            index.matched_blocks(hashes) if index is not None and hashes else _NO_MATCHES
        )
        # Memos: many candidates share a device model, and several scorers and the
        # decider ask the same questions of one candidate.
        self._prefill: dict[tuple[int, int], float] = {}
        self._prefill_by_view: dict[str, float] = {}
        self._step: dict[str, float] = {}
        self._idle_step: dict[int, float] = {}
        self._load: dict[str, float] = {}

    def cached_tokens(self, view: BackendView) -> int:
        """Prompt tokens ``view`` likely holds in its prefix cache (at least one is computed)."""
        blocks = self.matched_blocks.get(view.id, 0)
        if not blocks:
            return 0
        features = self.features
        tokens = int(blocks * features.prefix_block_tokens)
        return min(tokens, features.prompt_tokens - 1)

    def prefill_s(self, view: BackendView) -> float | None:
        """The request's own prefill on ``view`` (its cached prefix skipped)."""
        value = self._prefill_by_view.get(view.id)
        if value is None:
            perf = view.perf
            if perf is None:
                return None
            features = self.features
            blocks = self.matched_blocks.get(view.id, 0)
            cached = (
                min(int(blocks * features.prefix_block_tokens), features.prompt_tokens - 1)
                if blocks
                else 0
            )
            key = (id(perf), cached)
            value = self._prefill.get(key)
            if value is None:
                value = self._prefill[key] = perf.timing.prefill_seconds_one(
                    features.prompt_tokens, cached
                )
            self._prefill_by_view[view.id] = value
        return value

    def ttft_s(self, view: BackendView) -> float | None:
        """Queued prefills ahead of it, then its own."""
        value = self._prefill_by_view.get(view.id)
        if value is None:
            value = self.prefill_s(view)
            if value is None:
                return None
        return view.queue_wait_s + value

    def step_s(self, view: BackendView) -> float | None:
        """One decode iteration on ``view`` once this request joins its batch."""
        value = self._step.get(view.id)
        if value is None:
            perf = view.perf
            if perf is None:
                return None
            features = self.features
            running = view.running + 1
            context = view.context_tokens + features.prompt_tokens + features.max_tokens // 2
            value = self._step[view.id] = perf.timing.decode_step_seconds_of(
                running, context, -(-context // running)
            )
        return value

    def decode_share_s(self, view: BackendView) -> float | None:
        """Device time the request's decode takes on ``view``: its output tokens' steps,
        each shared with the rest of the batch. What its decode costs, in device-seconds."""
        step = self.step_s(view)
        return None if step is None else self.features.max_tokens * step / (view.running + 1)

    def load(self, view: BackendView) -> float:
        """How busy ``view`` is, for this request: 0 (idle) .. 1 (full).

        The largest of how full the device is (the share of the wait for this request's
        prefill that is prompts queued ahead of it; on a device that decodes, the share of
        its KV in use and the share of a decode iteration that its running sequences
        add) and how much of this request's targets that load takes (the queue against
        the TTFT target, the decode iteration against the TPOT target). A device with no
        performance model counts as full.
        """
        value = self._load.get(view.id)
        if value is not None:
            return value
        prefill = self.prefill_s(view)
        if prefill is None:
            return 1.0
        slo = self.slo
        queued = view.queue_wait_s
        value = queued / (queued + prefill) if queued > 0 else 0.0
        if slo.ttft_s is not None and queued > 0:
            value = max(value, queued / slo.ttft_s)
        if view.role is not Role.PREFILL:
            step = self._step.get(view.id) or self.step_s(view) or 0.0
            alone = self._alone_step_s(view)
            value = max(value, 1.0 - view.kv_free_fraction)
            if step > alone:
                value = max(value, 1.0 - alone / step)
            if slo.tpot_s is not None:
                value = max(value, step / slo.tpot_s)
        value = min(value, 1.0)
        self._load[view.id] = value
        return value

    def _alone_step_s(self, view: BackendView) -> float:
        """A decode iteration of this request alone on ``view``'s hardware."""
        perf = view.perf
        if perf is None:
            return 0.0
        value = self._idle_step.get(id(perf))
        if value is None:
            features = self.features
            context = features.prompt_tokens + features.max_tokens // 2
            value = self._idle_step[id(perf)] = perf.timing.decode_step_seconds_of(
                1, context, context
            )
        return value
