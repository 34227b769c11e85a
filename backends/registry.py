"""Adapter lookup by the ``kind`` of a pool-file backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from backends.base import Backend
from backends.mock.adapter import MockBackend
from backends.openai import OpenAIBackend
from backends.sglang import SglangBackend
from backends.vllm import VllmBackend

# (backend id, address, kind-specific options from the pool file) -> adapter
BackendFactory = Callable[[str, str, Mapping[str, Any]], Backend]

_ADAPTERS: dict[str, BackendFactory] = {
    "mock": MockBackend,
    "vllm": VllmBackend,
    "sglang": SglangBackend,
    "openai": OpenAIBackend,
}


def register(kind: str, factory: BackendFactory) -> None:
    _ADAPTERS[kind] = factory


def known_kinds() -> list[str]:
    return sorted(_ADAPTERS)


def create(
    kind: str, backend_id: str, address: str, options: Mapping[str, Any] | None = None
) -> Backend:
    factory = _ADAPTERS.get(kind)
    if factory is None:
        raise ValueError(f"unknown backend kind {kind!r}; known: {', '.join(known_kinds())}")
    return factory(backend_id, address, options or {})
