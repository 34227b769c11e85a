"""A backend for tests to script: always healthy, no load report, every leg unscripted.

Tests subclass it and override what they script (a leg, health, capabilities).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

from backends.base import (
    Backend,
    BackendLoad,
    Capabilities,
    GenerationRequest,
    HandoffMode,
    HealthStatus,
    KVHandle,
    PrefillResult,
    Role,
)


class StubBackend(Backend):
    def __init__(self, backend_id: str, address: str, options: Mapping[str, Any]) -> None:
        super().__init__(backend_id, address, options)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(frozenset(Role), frozenset({HandoffMode.SEQUENTIAL}))

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def check_health(self, timeout_s: float) -> HealthStatus:
        return HealthStatus(serving=True)

    async def load(self, timeout_s: float) -> BackendLoad:
        return BackendLoad()

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        raise AssertionError(f"{type(self).__name__} does not prefill")

    def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        raise AssertionError(f"{type(self).__name__} does not decode")

    def generate(self, request: GenerationRequest, timeout_s: float) -> AsyncGenerator[bytes, None]:
        raise AssertionError(f"{type(self).__name__} does not generate")

    async def abort(self, request_id: str, timeout_s: float) -> None: ...
