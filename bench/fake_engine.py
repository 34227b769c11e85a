"""A zero-cost fake vLLM server as a process, for benchmarks: python -m bench.fake_engine.

Prints ``READY host:port`` once it serves, and exits when stdin closes. It is the
fake the vLLM adapter's contract tests use (bench/fake_vllm.py), which answers instantly.
``--sglang-mode prefill|decode`` gives it a role in SGLang's P/D protocol too, beside
vLLM's; it keeps no record of each request (only the leg counts of ``GET /fake/legs``),
so that a long benchmark does not grow it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Literal

import uvloop

from bench.fake_vllm import FakeVllm

_SGLANG_MODES: dict[str | None, Literal["prefill", "decode"] | None] = {
    None: None,
    "prefill": "prefill",
    "decode": "decode",
}


async def serve(sglang_mode: str | None) -> None:
    engine = FakeVllm(
        tokens=[f" t{i}" for i in range(16)],
        verify_issued=False,
        keep_requests=False,
        sglang_mode=_SGLANG_MODES[sglang_mode],
    )
    await engine.start()
    print(f"READY {engine.address}", flush=True)
    await asyncio.to_thread(sys.stdin.buffer.read)  # the parent holds our stdin
    await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_engine", description=__doc__)
    parser.add_argument("--sglang-mode", choices=("prefill", "decode"))
    uvloop.run(serve(parser.parse_args().sglang_mode))


if __name__ == "__main__":
    main()
