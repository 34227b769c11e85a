"""Adapter lookup by the ``kind`` of a pool-file backend, and the devices the router can run.

This module is the router's one door into the adapters: the router imports the
shared modules of ``backends`` (base, errors, prefix, perf, ...) and this registry,
never an adapter's own package.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from backends.base import Backend
from backends.mock import cli as mock_cli
from backends.mock.adapter import MockBackend
from backends.mock.process import READY_PREFIX as DEVICE_READY_PREFIX
from backends.openai import OpenAIBackend
from backends.sglang import SglangBackend
from backends.vllm import VllmBackend

__all__ = [
    "DEVICE_READY_PREFIX",
    "BackendFactory",
    "add_device_arguments",
    "create",
    "known_kinds",
    "register",
    "run_device",
]

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


# The mock device server, run by ``hetero-router device`` (and as the children of
# ``hetero-router up``, which print DEVICE_READY_PREFIX + host:port once serving).
add_device_arguments: Callable[[argparse.ArgumentParser], None] = mock_cli.add_arguments
run_device: Callable[[argparse.Namespace], int] = mock_cli.run
