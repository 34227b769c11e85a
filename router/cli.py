"""The ``hetero-router`` command: serve, device, up, generate, simulate, plan."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import uvloop
from pydantic import ValidationError

from backends.base import Role
from backends.mock.process import run_device
from backends.mock.server import DeviceConfig
from router import __version__
from router._gen.hetero.router.v1 import router_pb2
from router.client import RouterClient
from router.cluster import embedded_devices
from router.daemon import Daemon
from router.errors import ConfigError
from router.logging import configure, get_logger
from router.settings import Settings, load_pool
from router.sim import commands as sim_commands

log = get_logger(__name__)


def _settings(options: argparse.Namespace) -> Settings:
    """Environment settings, overridden by the flags that were given."""
    overrides: dict[str, Any] = {
        "pool_file": getattr(options, "pool", None),
        "grpc_address": getattr(options, "grpc_address", None),
        "http_address": getattr(options, "http_address", None),
    }
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


async def _serve(settings: Settings, pool_path: Path | None, embedded: bool,
                 time_scale: float | None) -> None:  # fmt: skip

    pool = load_pool(pool_path)
    if not embedded:
        daemon = Daemon(settings, pool)
        await daemon.start()
        await daemon.serve_until_signalled()
        return
    async with embedded_devices(
        pool, ready_timeout_s=settings.device_ready_timeout_s, time_scale=time_scale
    ) as resolved:
        daemon = Daemon(settings, resolved)
        await daemon.start()
        await daemon.serve_until_signalled()


def cmd_serve(options: argparse.Namespace, embedded: bool = False) -> int:
    settings = _settings(options)
    configure(settings.log_level, settings.log_format)
    uvloop.run(_serve(settings, settings.pool_file, embedded, getattr(options, "time_scale", None)))
    return 0


def cmd_device(options: argparse.Namespace) -> int:

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
    )
    uvloop.run(
        run_device(
            config,
            options.listen,
            announce=options.announce,
            exit_with_stdin=options.exit_with_stdin,
        )
    )
    return 0


def cmd_generate(options: argparse.Namespace) -> int:

    route_shown = False
    with RouterClient(options.address, timeout_s=options.timeout) as client:
        stream = client.generate(
            options.prompt,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=options.stop or (),
            model=options.model,
            disaggregation=options.mode,
            slo_ttft_ms=options.slo_ttft_ms,
            slo_tpot_ms=options.slo_tpot_ms,
            priority=options.priority,
            slo_class=options.slo_class,
        )
        for response in stream:
            if options.show_route and not route_shown and response.HasField("route"):
                route = response.route
                print(
                    f"[route {route.request_id}: prefill={route.prefill_backend} "
                    f"decode={route.decode_backend} seed={route.seed}]",
                    file=sys.stderr,
                )
                route_shown = True
            print(response.text, end="", flush=True)
            if response.finish_reason:
                usage = response.usage
                print(
                    f"\n[finish: {_finish_name(response.finish_reason)}, "
                    f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
                    file=sys.stderr,
                )
    return 0


def _finish_name(value: int) -> str:

    return router_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero-router",
        description="Serve LLM generation across heterogeneous accelerators.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def router_flags(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--pool", type=Path, help="pool file (YAML); default: the packaged one"
        )
        command.add_argument("--grpc-address", help="gRPC front door (default 127.0.0.1:50051)")
        command.add_argument("--http-address", help="HTTP admin port (default 127.0.0.1:8080)")

    serve = commands.add_parser("serve", help="run the router over the backends of a pool file")
    router_flags(serve)
    up = commands.add_parser("up", help="start the pool's mock devices, then the router")
    router_flags(up)
    up.add_argument("--time-scale", type=float, help="override every device's time scale")

    device = commands.add_parser("device", help="run one mock device server")
    device.add_argument("--id", required=True)
    device.add_argument("--profile", required=True, help="hardware to emulate, e.g. h100")
    device.add_argument("--model", default="llama-3.1-8b", help="model size to emulate")
    device.add_argument("--roles", default="prefill,decode", help="comma list: prefill,decode")
    device.add_argument("--listen", default="127.0.0.1:0")
    device.add_argument("--time-scale", type=float, default=1.0, help="0 disables waiting")
    device.add_argument("--kv-lease-s", type=float, default=30.0)
    device.add_argument("--seed", type=int, default=0, help="weights seed of the tiny model")
    device.add_argument(
        "--decode-step-ms",
        type=float,
        help="fixed decode step (paces every stream), for benchmarks",
    )
    device.add_argument(
        "--kv-failure-policy",
        choices=["retry", "recompute", "fail"],
        default="recompute",
        help="when the KV cannot be pulled: pull again then prefill locally, prefill "
        "locally, or fail the request",
    )
    device.add_argument(
        "--tensor-parallel", type=int, default=1, help="ranks the KV heads split over (1, 2, 4)"
    )
    device.add_argument("--block-size", type=int, default=16, help="KV tokens per block")
    device.add_argument(
        "--emulate-kv-size",
        action="store_true",
        help="pad leased KV to the emulated model's size (transfers at real volume)",
    )
    device.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=0,
        help="prompt blocks (64 tokens) a prefix cache keeps; a cached head is not "
        "prefilled again (0: no prefix cache)",
    )
    device.add_argument(
        "--chips",
        type=int,
        default=None,
        help="chips of the profile the emulated deployment spans (default: the fewest "
        "that hold the model)",
    )
    device.add_argument("--announce", action="store_true", help="print READY host:port")
    device.add_argument("--exit-with-stdin", action="store_true", help="exit when stdin closes")

    generate = commands.add_parser("generate", help="stream the tokens of one prompt")
    generate.add_argument("prompt")
    generate.add_argument("--address", default="127.0.0.1:50051")
    generate.add_argument("--max-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--model", default="")
    generate.add_argument("--mode", choices=["auto", "split", "colocated"], default="auto")
    generate.add_argument(
        "--slo-ttft-ms", type=int, help="time to first token target (default: the SLO class's)"
    )
    generate.add_argument(
        "--slo-tpot-ms", type=int, help="time per output token target (default: the SLO class's)"
    )
    generate.add_argument(
        "--priority", type=int, default=0, help="0..9, larger is more urgent (default 0)"
    )
    generate.add_argument(
        "--slo-class", default="", help="SLO class of the scheduling policy (default: default)"
    )
    generate.add_argument("--timeout", type=float, default=120.0)
    generate.add_argument("--show-route", action="store_true")
    sim_commands.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        if options.command == "device":
            return cmd_device(options)
        if options.command == "generate":
            return cmd_generate(options)
        if options.command in sim_commands.COMMANDS:
            return sim_commands.run_command(options)
        return cmd_serve(options, embedded=options.command == "up")
    except (ConfigError, ValidationError, ValueError, OSError) as error:
        print(f"hetero-router: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"hetero-router: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
