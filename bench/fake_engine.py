"""A zero-cost fake vLLM server as a process, for benchmarks: python -m bench.fake_engine.

Prints ``READY host:port`` once it serves, and exits when stdin closes. It is the
fake the vLLM adapter's contract tests use (bench/fake_vllm.py), which answers instantly.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from bench.fake_vllm import FakeVllm


async def serve() -> None:
    engine = FakeVllm(tokens=[f" t{i}" for i in range(16)], verify_issued=False)
    await engine.start()
    print(f"READY {engine.address}", flush=True)
    await asyncio.to_thread(sys.stdin.buffer.read)  # the parent holds our stdin
    await engine.stop()


if __name__ == "__main__":
    uvloop.run(serve())
