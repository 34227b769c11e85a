"""What a client sees when its decode device is killed or stopped mid-stream.

``python -m bench.stream_gap``: one prefill and two decode mock devices as processes
(20 ms a decode step), a router with the default settings in this process. A seeded
300-token split runs once undisturbed, then again with its decode device sent
SIGKILL (and, in a second cluster, SIGSTOP) after 50 tokens. Printed per signal:
tokens received, whether they equal the undisturbed run's, the longest gap between
two messages, and the migrations the router counted.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time

from backends.base import Role
from router.client import AsyncRouterClient
from router.cluster import embedded_devices
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings

MODEL = "llama-3.1-8b"
PROMPT = "x" * 600
TOKENS = 300
KILL_AFTER = 50
SAMPLING: dict[str, object] = {"max_tokens": TOKENS, "temperature": 0.8, "seed": 5}


def pool() -> PoolConfig:
    prefill = BackendConfig(
        id="h100-0", address="127.0.0.1:0", role=Role.PREFILL, model=MODEL, profile="h100"
    )
    decode = tuple(
        BackendConfig(
            id=f"groq-{i}", address="127.0.0.1:0", role=Role.DECODE, model=MODEL, profile="groq-lpu"
        )
        for i in range(2)
    )
    return PoolConfig(backends=(prefill, *decode))


async def one(signum: signal.Signals) -> str:
    pids: dict[str, int] = {}
    pace = ["--decode-step-ms", "20"]
    async with embedded_devices(pool(), ready_timeout_s=60, extra_args=pace, pids=pids) as live:
        settings = Settings(
            grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", log_level="warning"
        )
        daemon = Daemon(settings, live)
        await daemon.start()
        try:
            async with AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=120) as client:
                expected = [
                    token
                    async for message in client.generate(PROMPT, disaggregation="split", **SAMPLING)
                    for token in message.token_ids
                ]
                got: list[int] = []
                stamps: list[float] = []
                victim = ""
                async for message in client.generate(PROMPT, disaggregation="split", **SAMPLING):
                    if message.HasField("route"):
                        victim = message.route.decode_backend
                    got.extend(message.token_ids)
                    stamps.append(time.monotonic())
                    if victim and len(got) >= KILL_AFTER:
                        os.kill(pids[victim], signum)
                        victim = ""
            if signum is signal.SIGSTOP:
                for pid in pids.values():
                    os.kill(pid, signal.SIGCONT)
            gap = max(b - a for a, b in itertools.pairwise(stamps))
            migrations = daemon.registry.get_sample_value(
                "hetero_router_retries_total", {"kind": "migration"}
            )
            return (
                f"{signum.name}: tokens {len(got)}/{len(expected)}, equal to the undisturbed "
                f"run: {got == expected}, longest gap {gap:.2f} s (20 ms a token), "
                f"migrations {migrations or 0:g}"
            )
        finally:
            await daemon.stop()


async def main() -> None:
    for signum in (signal.SIGKILL, signal.SIGSTOP):
        print(await one(signum), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
