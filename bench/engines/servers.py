"""Real vLLM servers (CPU build) and vllm-router, started as child processes on 127.0.0.1.

The real-engine tests (tests/engines/) and the ``engines`` bench scenario share these.
Settings follow what keeps a CPU engine sane on a busy 2-core machine: one OpenMP
thread (two spin-wait on a descheduled thread and decode collapses), eager mode (no
torch.compile at start-up), UCX confined to loopback, and for a P/D pair NIXL over
CPU buffers with a KV lease of ``KV_LEASE_S`` (vLLM's 30 s default expires under
load) and ``recompute`` on a failed KV load.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.engines import env
from bench.engines.engine_site.step_gate import STEP_GATE_ENV

ENGINE_SITE = Path(__file__).resolve().parent / "engine_site"
STEP_GATE_PROCESSOR = "step_gate:StepGateProcessor"  # importable from ENGINE_SITE
SERVED_MODEL = "tiny-llama"
MAX_MODEL_LEN = 2048
KV_LEASE_S = 120
# Start-up is 35-75 s alone; two engines starting at once on 2 busy cores take longer.
START_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 30.0

ENGINE_ENVIRONMENT: Mapping[str, str] = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
    "UCX_NET_DEVICES": "lo",
    "UCX_TLS": "self,sm,tcp",
}


def free_port() -> int:
    """A port free now on 127.0.0.1 (for a child process that needs a number)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kv_transfer_config(role: str) -> str:
    return json.dumps(
        {
            "kv_connector": "NixlConnector",
            "kv_role": role,
            "kv_buffer_device": "cpu",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"kv_lease_duration": KV_LEASE_S},
        }
    )


class EngineStartError(RuntimeError):
    """A server exited or never became healthy; the message carries its log's tail."""


@dataclass
class Server:
    """One child server process with its log file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"\n=== start {' '.join(self.argv)}\n".encode())
        log.flush()
        self.process = subprocess.Popen(  # argv built here, no shell
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.environment},
            start_new_session=True,  # its own group: stop() reaches the engine core too
        )
        log.close()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S, path: str = "/health") -> None:
        """Polls ``path`` until it answers 200; fails at once if the process exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise EngineStartError(
                    f"{self.name} exited before it was ready:\n{self.log_tail()}"
                )
            if self.get_status(path) == 200:
                return
            time.sleep(0.5)
        raise EngineStartError(f"{self.name} not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def get_status(self, path: str, timeout_s: float = 5.0) -> int | None:
        try:
            with urllib.request.urlopen(
                self.url + path, timeout=timeout_s
            ) as answer:  # a local http URL built here
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except (OSError, ValueError):
            return None

    def get_json(self, path: str, timeout_s: float = 10.0) -> Any:
        with urllib.request.urlopen(
            self.url + path, timeout=timeout_s
        ) as answer:  # a local http URL built here
            return json.loads(answer.read())

    def post_json(self, path: str, body: Mapping[str, Any], timeout_s: float = 120.0) -> Any:
        request = urllib.request.Request(  # a local http URL built here
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # as above
            return json.loads(answer.read())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signals the whole process group and waits; SIGKILL after STOP_TIMEOUT_S."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Children of a killed parent (the engine core) may linger in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class VllmServer(Server):
    """A vLLM OpenAI-compatible server."""

    def metrics(self) -> dict[str, float]:
        """Its Prometheus samples summed over engines, keyed ``name{label="v",...}``
        without the ``engine`` and ``model_name`` labels."""
        with urllib.request.urlopen(
            self.url + "/metrics", timeout=10
        ) as answer:  # a local http URL built here
            text = answer.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {
                    k: v for k, v in sample.labels.items() if k not in ("engine", "model_name")
                }
                key = sample.name
                if labels:
                    key += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                samples[key] = samples.get(key, 0.0) + float(sample.value)
        return samples

    def hold_after(self, steps: int) -> None:
        """Lets the engine make ``steps`` more steps (a token per running request each),
        then holds its core still until ``release``; a ``gated`` server only
        (engine_site/step_gate.py). Its HTTP server goes on meanwhile: what was made
        still streams out, and aborts are taken."""
        gate = self.gate_path()
        written = gate.with_suffix(".next")
        written.write_text(f"{steps} {time.monotonic_ns()}\n")  # unlike the last one
        os.replace(written, gate)  # whole at once: the core never reads half a file

    def release(self) -> None:
        """Lets a held engine go on, with no limit."""
        self.gate_path().unlink(missing_ok=True)

    def gate_path(self) -> Path:
        named = self.environment.get(STEP_GATE_ENV)
        if named is None:
            raise ValueError(f"{self.name} was not started gated (vllm_server(gated=True))")
        return Path(named)

    def log_size(self) -> int:
        """Bytes in its log so far: where ``logged_since`` starts reading."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def logged_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


def vllm_server(
    name: str,
    model: Path,
    log_dir: Path,
    *,
    kv_role: str | None = None,
    extra_args: tuple[str, ...] = (),
    gated: bool = False,
) -> VllmServer:
    """A vLLM server for ``model``; with ``kv_role`` it runs the NixlConnector. A
    ``gated`` one runs engine_site/step_gate.py's gate on its steps (``hold_after``,
    ``release``) and logs each request it takes and aborts, so that a test can hold the
    engine still mid-request and see what reached it."""
    port = free_port()
    argv = [
        str(env.python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "2048",
        "--enforce-eager",
        "--disable-uvicorn-access-log",
        *extra_args,
    ]
    environment = dict(ENGINE_ENVIRONMENT)
    if kv_role is not None or gated:
        environment["PYTHONPATH"] = str(ENGINE_SITE)
    if gated:
        argv += ["--enable-log-requests", "--logits-processors", STEP_GATE_PROCESSOR]
        environment[STEP_GATE_ENV] = str(log_dir / f"{name}.gate")
    if kv_role is not None:
        argv += ["--kv-transfer-config", kv_transfer_config(kv_role)]
        side_channel = free_port()
        environment["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel)
        ucx_base = 20000 + (side_channel % 400) * 100
        environment["UCX_TCP_PORT_RANGE"] = f"{ucx_base}-{ucx_base + 99}"
    return VllmServer(name, argv, port, log_dir / f"{name}.log", environment)


def vllm_router(prefill: Server, decode: Server, log_dir: Path) -> Server:
    """vLLM's Rust router in P/D mode in front of one prefill and one decode server."""
    return vllm_router_at(env.bin_path("vllm-router"), prefill.url, decode.url, log_dir)


def vllm_router_at(
    binary: Path, prefill_url: str, decode_url: str, log_dir: Path, *extra: str
) -> Server:
    """The ``vllm-router`` at ``binary`` in vLLM P/D mode with the NIXL connector, on a
    free port of 127.0.0.1, with ``extra`` arguments after its own."""
    port = free_port()
    argv = [
        str(binary),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--vllm-pd-disaggregation",
        "--prefill",
        prefill_url,
        "--decode",
        decode_url,
        "--kv-connector",
        "nixl",
        *extra,
    ]
    return Server("vllm-router", argv, port, log_dir / "vllm-router.log")


@contextlib.contextmanager
def running(*servers: Server, timeout_s: float = START_TIMEOUT_S) -> Iterator[None]:
    """Starts the servers together, waits until all are ready, stops them on exit."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout_s)
        yield
    finally:
        for server in servers:
            server.stop()
