"""The ``hetero-router`` command: serve, device, up, generate, simulate, plan."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
import uvloop
from pydantic import ValidationError

from backends import registry as adapters
from backends._gen.hetero.router.v1 import router_pb2
from backends.config_files import problems
from router import __version__, defaults
from router.api.listen import check_can_listen
from router.client import DEFAULT_ADDRESS, ChannelConfig, RouterClient
from router.cluster import embedded_devices
from router.daemon import Daemon, build_tracing
from router.errors import ConfigError, shown
from router.logging import configure, get_logger
from router.scheduling.registry import build_scheduler
from router.settings import MAX_TIME_SCALE, Settings, load_pool, settings_from
from router.sim import commands as sim_commands
from router.workers import Supervisor

log = get_logger(__name__)


# The settings the flags of serve/up override, and the flag each comes from.
_FLAGS = {
    "pool_file": "--pool",
    "grpc_address": "--grpc-address",
    "http_address": "--http-address",
    "insecure": "--insecure",
    "workers": "--workers",
}


def _settings(options: argparse.Namespace) -> Settings:
    """Environment settings, overridden by the flags that were given."""
    overrides: dict[str, Any] = {
        "pool_file": getattr(options, "pool", None),
        "grpc_address": getattr(options, "grpc_address", None),
        "http_address": getattr(options, "http_address", None),
        "insecure": getattr(options, "insecure", None) or None,
        "workers": getattr(options, "workers", None),
    }
    given = {key: value for key, value in overrides.items() if value is not None}
    return settings_from(given, _FLAGS)


def _check_files(settings: Settings) -> None:
    """Reads every file the settings name (policy, TLS pair, tokens) before anything
    starts: a broken one is refused before any device or backend is touched."""
    build_scheduler(settings)
    settings.tls_files()
    settings.auth_tokens()


async def _serve(settings: Settings, pool_path: Path | None, embedded: bool,
                 time_scale: float | None) -> int:  # fmt: skip

    pool = load_pool(pool_path)
    _check_files(settings)
    tracing = build_tracing(settings)  # a missing extra is refused before devices start
    if settings.workers > 1 and tracing is not None:  # each worker exports its own
        await asyncio.to_thread(tracing.shutdown)
    if not embedded:
        if settings.workers > 1:
            return await Supervisor(settings, pool, pool_path).serve()
        return await Daemon(settings, pool, tracing=tracing, pool_file=pool_path).serve(
            own_process=True
        )
    async with embedded_devices(
        pool,
        ready_timeout_s=settings.device_ready_timeout_s,
        time_scale=time_scale,
        log_level=settings.log_level,
        log_format=settings.log_format,
    ) as resolved:
        if settings.workers > 1:  # the workers share the devices this process started
            return await Supervisor(settings, resolved, None).serve()
        return await Daemon(settings, resolved, tracing=tracing).serve(own_process=True)


def cmd_serve(options: argparse.Namespace, embedded: bool = False) -> int:
    settings = _settings(options)
    settings.check_exposure()  # before anything starts (the Daemon checks again)
    for address, door in ((settings.grpc_address, "gRPC"), (settings.http_address, "HTTP")):
        check_can_listen(address, door)  # likewise: a taken port is one line, nothing started
    configure(settings.log_level, settings.log_format)
    return uvloop.run(
        _serve(settings, settings.pool_file, embedded, getattr(options, "time_scale", None))
    )


def cmd_generate(options: argparse.Namespace) -> int:

    route_shown = False
    with RouterClient(_channel(options)) as client:
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

    name = router_pb2.FinishReason.Name(router_pb2.FinishReason.ValueType(value))
    return name.removeprefix("FINISH_REASON_").lower()


def time_scale(text: str) -> float:
    """The ``--time-scale`` flag: a finite number, 0 (no modelled waits) to MAX_TIME_SCALE."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_TIME_SCALE:  # NaN fails this too
        raise argparse.ArgumentTypeError(
            f"must be a number from 0 to {MAX_TIME_SCALE:g}, got {shown(text)}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """Says a bad command line in one line, as every other start-up problem is said."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _channel(options: argparse.Namespace) -> ChannelConfig:
    """How ``generate`` reaches the router: TLS (and a client certificate for mTLS) and
    a bearer token read from files, as the router itself reads them."""

    def read(path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as error:
            raise ConfigError(f"cannot read {what} {path}: {error.strerror}") from error

    token = read(options.token_file, "--token-file")
    lines = [] if token is None else token.decode(errors="replace").split()
    if token is not None and not lines:
        raise ConfigError(f"--token-file {options.token_file} holds no token")
    tls = options.tls or any(
        path is not None for path in (options.ca_file, options.cert_file, options.key_file)
    )
    return ChannelConfig(
        address=options.address,
        timeout_s=options.timeout,
        tls=tls,
        root_certificates=read(options.ca_file, "--ca-file"),
        certificate_chain=read(options.cert_file, "--cert-file"),
        private_key=read(options.key_file, "--key-file"),
        bearer_token=lines[0] if lines else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hetero-router",
        description="Serve LLM generation across heterogeneous accelerators.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def router_flags(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--pool", type=Path, help="pool file (YAML); default: the packaged one"
        )
        command.add_argument("--grpc-address", help=f"gRPC front door (default {DEFAULT_ADDRESS})")
        command.add_argument(
            "--http-address",
            help=f"HTTP door: OpenAI routes, metrics, probes (default {defaults.HTTP_ADDRESS})",
        )
        command.add_argument(
            "--insecure",
            action="store_true",
            help="serve doors beyond loopback with no token file and no mTLS (logged)",
        )
        command.add_argument(
            "--workers",
            type=int,
            help="router processes sharing both ports, under one supervisor (default 1)",
        )

    serve = commands.add_parser("serve", help="run the router over the backends of a pool file")
    router_flags(serve)
    up = commands.add_parser("up", help="start the pool's mock devices, then the router")
    router_flags(up)
    up.add_argument("--time-scale", type=time_scale, help="override every device's time scale")

    device = commands.add_parser("device", help="run one mock device server")
    adapters.add_device_arguments(device)

    generate = commands.add_parser("generate", help="stream the tokens of one prompt")
    generate.add_argument("prompt")
    generate.add_argument("--address", default=DEFAULT_ADDRESS)
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
    generate.add_argument(
        "--token-file", type=Path, help="file whose first token is sent as the bearer token"
    )
    generate.add_argument("--tls", action="store_true", help="connect with TLS")
    generate.add_argument(
        "--ca-file", type=Path, help="PEM roots to verify the router with (implies --tls)"
    )
    generate.add_argument("--cert-file", type=Path, help="PEM client certificate for mTLS")
    generate.add_argument("--key-file", type=Path, help="PEM key of --cert-file")
    sim_commands.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        if options.command == "device":
            return adapters.run_device(options)
        if options.command == "generate":
            return cmd_generate(options)
        if options.command in sim_commands.COMMANDS:
            return sim_commands.run_command(options)
        return cmd_serve(options, embedded=options.command == "up")
    except ValidationError as error:  # a model built outside the file readers
        print(f"hetero-router: {problems(error)}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, OSError) as error:
        print(f"hetero-router: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"hetero-router: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
