"""Load against a running router (or one device): python -m bench.load --help.

    .venv/bin/python -m bench.load --workload chatbot --rate 4 --requests 200 --slo chatbot
    .venv/bin/python -m bench.load --trace trace.jsonl --slo interactive --out run.json
    .venv/bin/python -m bench.load --trace conversation_trace.jsonl --requests 50 --device

Open loop at --rate (Poisson) or closed loop at --concurrency; a trace file replays
its own arrivals: the project's JSONL (arrival_s, prompt_tokens, output_tokens), or
Mooncake, Azure or BurstGPT as published (--trace-format, else told from the file).
A trace's block hash chains become prompts whose blocks repeat where its ids do.
Bounded by --requests and --max-duration; prints percentiles, throughput, SLO
attainment and goodput (a failed or timed-out request counts as a miss).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import uvloop

from bench.loadgen import (
    DeviceTarget,
    HttpTarget,
    RouterTarget,
    Target,
    closed_loop,
    open_loop,
)
from bench.progress import Progress
from router.client import DEFAULT_ADDRESS
from router.scheduling.slo import SLO_PRESETS
from router.sim.metrics import summarize
from router.sim.traces import TRACE_FORMATS, read_trace
from router.sim.workload import WORKLOADS, RequestSpec, generate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port (127.0.0.1)")
    door = parser.add_mutually_exclusive_group()
    door.add_argument("--device", action="store_true", help="the address is a mock device")
    door.add_argument(
        "--http", action="store_true", help="the address is the router's HTTP door (/v1)"
    )
    parser.add_argument("--mode", choices=["auto", "split", "colocated"], default="auto")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--workload", choices=sorted(WORKLOADS), default="chatbot")
    source.add_argument("--trace", type=Path, help="trace to replay (its own arrivals)")
    parser.add_argument(
        "--trace-format", choices=TRACE_FORMATS, default="auto", help="the trace's format"
    )
    pacing = parser.add_mutually_exclusive_group()
    pacing.add_argument("--rate", type=float, help="requests per second, Poisson arrivals")
    pacing.add_argument("--concurrency", type=int, help="requests kept in flight")
    parser.add_argument("--requests", type=int, default=100, help="how many to send")
    parser.add_argument("--max-duration", type=float, default=300.0, help="seconds, at most")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--slo", choices=sorted(SLO_PRESETS), help="SLO for attainment/goodput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the summary as JSON here too")
    return parser


def _specs(options: argparse.Namespace) -> list[RequestSpec]:
    if options.trace is not None:
        trace = read_trace(options.trace, options.trace_format)
        print(trace.describe(), file=sys.stderr)
        return trace.requests[: options.requests]
    rate = options.rate if options.concurrency is None else None
    return generate(options.workload, options.requests, rate_per_s=rate, seed=options.seed)


async def _run(options: argparse.Namespace) -> dict[str, Any]:
    specs = _specs(options)
    target: Target
    if options.device:
        target = DeviceTarget(options.address)
    elif options.http:
        target = HttpTarget(f"http://{options.address}", disaggregation=options.mode)
    else:
        target = RouterTarget(options.address, disaggregation=options.mode)
    progress = Progress("requests", len(specs))
    try:
        async with asyncio.timeout(options.max_duration):
            if options.concurrency is not None:
                records, duration = await closed_loop(
                    target, specs, options.concurrency, timeout_s=options.timeout,
                    on_done=progress.advance,
                )  # fmt: skip
            else:
                records, duration = await open_loop(
                    target, specs, timeout_s=options.timeout, on_done=progress.advance
                )
    finally:
        progress.close()
        await target.close()
    slo = SLO_PRESETS[options.slo] if options.slo else None
    return summarize(records, duration, slo).to_dict()


def main() -> int:
    options = _parser().parse_args()
    if options.requests < 1:
        print("--requests must be at least 1", file=sys.stderr)
        return 2
    try:
        summary = uvloop.run(_run(options))
    except TimeoutError:
        print(f"stopped after --max-duration {options.max_duration} s", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"bench.load: {error}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    print(text)
    if options.out is not None:
        options.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
