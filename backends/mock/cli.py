"""The ``hetero-router device`` command: one mock device server from its flags."""

from __future__ import annotations

import argparse

import uvloop

from backends import logs
from backends.base import Role
from backends.config_files import host_port
from backends.kv_events import DEFAULT_TOPIC
from backends.mock.config import BLOCK_SIZE, DeviceConfig
from backends.mock.lease import DEFAULT_KV_LEASE_S
from backends.mock.process import run_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", required=True)
    parser.add_argument("--profile", required=True, help="hardware to emulate, e.g. h100")
    parser.add_argument("--model", default="llama-3.1-8b", help="model size to emulate")
    parser.add_argument("--roles", default="prefill,decode", help="comma list: prefill,decode")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--time-scale", type=float, default=1.0, help="0 disables waiting")
    parser.add_argument("--kv-lease-s", type=float, default=DEFAULT_KV_LEASE_S)
    parser.add_argument("--seed", type=int, default=0, help="weights seed of the tiny model")
    parser.add_argument(
        "--decode-step-ms",
        type=float,
        help="fixed decode step (paces every stream), for benchmarks",
    )
    parser.add_argument(
        "--kv-failure-policy",
        choices=["retry", "recompute", "fail"],
        default="recompute",
        help="when the KV cannot be pulled: pull again then prefill locally, prefill "
        "locally, or fail the request",
    )
    parser.add_argument(
        "--tensor-parallel", type=int, default=1, help="ranks the KV heads split over (1, 2, 4)"
    )
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="KV tokens per block")
    parser.add_argument(
        "--emulate-kv-size",
        action="store_true",
        help="pad leased KV to the emulated model's size (transfers at real volume)",
    )
    parser.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=0,
        help="prompt blocks (64 tokens) a prefix cache keeps; a cached head is not "
        "prefilled again (0: no prefix cache)",
    )
    parser.add_argument(
        "--kv-events-port",
        type=int,
        default=None,
        help="publish the prefix cache's KV events (vLLM's ZMQ format) on this port "
        "(0: a free one; unset: no events)",
    )
    parser.add_argument(
        "--kv-events-replay-port",
        type=int,
        default=0,
        help="port of the replay socket for missed KV events (0: a free one)",
    )
    parser.add_argument("--kv-events-topic", default=DEFAULT_TOPIC, help="topic of KV events")
    parser.add_argument(
        "--chips",
        type=int,
        default=None,
        help="chips of the profile the emulated deployment spans (default: the fewest "
        "that hold the model)",
    )
    parser.add_argument("--announce", action="store_true", help="print READY host:port")
    parser.add_argument("--exit-with-stdin", action="store_true", help="exit when stdin closes")
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument(
        "--log-format", choices=logs.FORMATS, default="json", help="json lines or console"
    )


def run(options: argparse.Namespace) -> int:
    """Serves one device until a signal (or stdin's end); the exit code."""
    host_port(options.listen)  # ValueError: one line, exit 2
    roles = tuple(Role(role.strip()) for role in options.roles.split(","))
    config = DeviceConfig(
        backend_id=options.id,
        profile=options.profile,
        model=options.model,
        roles=roles,
        time_scale=options.time_scale,
        kv_lease_s=options.kv_lease_s,
        seed=options.seed,
        decode_step_s=options.decode_step_ms / 1000 if options.decode_step_ms else None,
        kv_failure_policy=options.kv_failure_policy,
        tensor_parallel=options.tensor_parallel,
        block_size=options.block_size,
        emulate_kv_size=options.emulate_kv_size,
        chips=options.chips,
        prefix_cache_blocks=options.prefix_cache_blocks,
        kv_events_port=options.kv_events_port,
        kv_events_replay_port=options.kv_events_replay_port,
        kv_events_topic=options.kv_events_topic,
    )  # ValueError too: the flags are checked before anything is configured
    # The router's log configuration (its level and format are passed on as flags);
    # every line names the device.
    logs.configure(options.log_level, options.log_format, fields={"device": options.id})
    uvloop.run(
        run_device(
            config,
            options.listen,
            announce=options.announce,
            exit_with_stdin=options.exit_with_stdin,
        )
    )
    return 0
