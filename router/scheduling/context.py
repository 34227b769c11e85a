"""What one decision knows: the request, the pool at that instant, the time, its SLO."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from router.pool.snapshot import BackendView, PoolSnapshot
from router.scheduling.plan import RequestFeatures, Slo

_NO_MATCHES: Mapping[str, int] = {}


@dataclass
class Context:
    """Built once per decision and shared by every plugin; nothing in it outlives the call."""

    features: RequestFeatures
    snapshot: PoolSnapshot
    now: float
    slo: Slo
    # Fixed cost of a split beyond the KV wire time (router hop, handle exchange), seconds.
    split_overhead_s: float = 0.0
    _matched: Mapping[str, int] | None = field(default=None, repr=False)
    # Memos: many candidates share a device model, and several scorers and the decider
    # ask the same questions of one candidate.
    _prefill: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)
    _prefill_by_view: dict[str, float] = field(default_factory=dict, repr=False)
    _step: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def matched_blocks(self) -> Mapping[str, int]:
        """Leading prompt blocks each backend holds (computed on first use)."""
        if self._matched is None:
            index = self.snapshot.prefix_index
            hashes = self.features.prefix_hashes
            self._matched = index.matched_blocks(hashes) if index and hashes else _NO_MATCHES
        return self._matched

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
        prefill = self.prefill_s(view)
        return None if prefill is None else view.queue_wait_s + prefill

    def step_s(self, view: BackendView) -> float | None:
        """One decode iteration on ``view`` once this request joins its batch."""
        value = self._step.get(view.id)
        if value is None:
            perf = view.perf
            if perf is None:
                return None
            features = self.features
            value = self._step[view.id] = perf.step_s(
                view.running + 1,
                view.context_tokens + features.prompt_tokens + features.max_tokens // 2,
            )
        return value
