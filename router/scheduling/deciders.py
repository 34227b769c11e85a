"""Deciders: split a request or serve it colocated."""

from __future__ import annotations

from typing import Protocol

from router.pool.snapshot import PoolSnapshot
from router.scheduling.plan import Disaggregation, Mode, RequestFeatures


class Decider(Protocol):
    def decide(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Mode:
        """The preferred mode; the scheduler falls back when that mode has no backends."""
        ...


class PromptLengthDecider:
    """Split prompts of at least ``min_prompt_tokens``.

    Short prefills are cheap on the decode device itself, and skipping the KV move
    saves more than a faster prefill gains.
    """

    name = "prompt-length"

    def __init__(self, min_prompt_tokens: int) -> None:
        self.min_prompt_tokens = min_prompt_tokens

    def decide(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Mode:
        if features.disaggregation is Disaggregation.SPLIT:
            return Mode.SPLIT
        if features.disaggregation is Disaggregation.COLOCATED:
            return Mode.COLOCATED
        return Mode.SPLIT if features.prompt_tokens >= self.min_prompt_tokens else Mode.COLOCATED
