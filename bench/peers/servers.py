"""The peer routers as child processes on 127.0.0.1, in P/D mode over one prefill and one
decode engine, with their own defaults but for where they listen.

Each gets a free port for its API and one for its Prometheus exporter (both default to
fixed ports, 30000 and 29000, and two routers on one machine would collide).
"""

from __future__ import annotations

from pathlib import Path

from bench.engines.servers import Server, free_port, vllm_router_at
from bench.peers import env

# sglang-router needs a bootstrap port per prefill engine; it only passes the number on
# to both legs (SGLang's default). The fake engines check it is a port, nothing more.
SGLANG_BOOTSTRAP_PORT = 8998


def vllm_router(prefill: str, decode: str, log_dir: Path) -> Server:
    """vllm-router in vLLM P/D mode with the NIXL connector (as scenario `engines` runs it)."""
    return vllm_router_at(
        env.bin_path("vllm-router"), f"http://{prefill}", f"http://{decode}", log_dir,
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
    )  # fmt: skip


def sglang_router(prefill: str, decode: str, log_dir: Path) -> Server:
    """sglang-router (SGLang's model gateway) in its P/D mode (bootstrap rooms)."""
    port = free_port()
    argv = [
        str(env.bin_path("sglang-router")),
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--pd-disaggregation",
        "--prefill",
        f"http://{prefill}",
        str(SGLANG_BOOTSTRAP_PORT),
        "--decode",
        f"http://{decode}",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
        # Its default waits 180 s for in-flight requests when stopped; the bench has none.
        "--shutdown-grace-period-secs",
        "1",
    ]
    return Server("sglang-router", argv, port, log_dir / "sglang-router.log")
