"""Imported at the start of every Python process of a vLLM server the bench starts.

bench/engines/servers.py puts this folder on the servers' ``PYTHONPATH`` to change
one setting neither vLLM nor NIXL's Python API exposes: the delay of NIXL's UCX
progress thread, which NIXL sets to 0, so that the thread polls without ever
sleeping. On a CPU-only machine with fewer cores than busy threads, one such thread
per engine starves the engines themselves: an idle engine burns a core, and a
0.25 MB KV read took from 8 ms to 12 s. With ``PROGRESS_DELAY_US`` between polls
an idle engine sleeps and a read costs at most that much more. (Turning the thread
off instead stalls a read until the prefill engine's next step, up to a minute
when it is idle.) It runs in every process because vLLM's workers are started with
``spawn``.
"""

from __future__ import annotations

import os
from typing import Any

PROGRESS_DELAY_US = int(os.environ.get("HETERO_ROUTER_NIXL_PROGRESS_DELAY_US", "1000"))

# vLLM sets this before it imports NIXL (a UCX leak work-around); NIXL is imported
# here first, so it is set here.
os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")


def _progress_thread_sleeps() -> None:
    try:
        from nixl import _api  # noqa: PLC0415  # NIXL exists in the engine environment only
    except ImportError:  # not the engine environment: nothing to change
        return
    bindings: Any = _api.nixlBind
    create = bindings.nixlAgent

    def agent(name: str, config: Any) -> Any:
        config.pthrDelay = PROGRESS_DELAY_US
        return create(name, config)

    bindings.nixlAgent = agent


_progress_thread_sleeps()
