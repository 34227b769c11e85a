"""The peer routers' environment: vllm-router and sglang-router (Rust, from PyPI) in a
virtual environment cached outside the repository, keyed by what it pins.

``python -m bench.peers.env`` installs it on first use (a minute or so: two wheels with
their dependencies) and prints its bin folder; later calls find it at once. The cache is
``$HETERO_ROUTER_PEERS_CACHE``, by default ``~/.cache/hetero-router/peers``:
``venv-<key>/`` is complete once ``venv-<key>/.complete`` exists (an interrupted install
is wiped and redone). ``<key>`` hashes bench/peers/requirements.txt, the one place the
versions are pinned, with the Python version.

An install that fails (no package index reachable, a pin that does not resolve) raises
:class:`PeerEnvUnavailableError` with the reason, which the scenario records as a skip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
CACHE_ENV = "HETERO_ROUTER_PEERS_CACHE"
COMPLETE = ".complete"
# The console scripts the scenario runs, and what each package is called on the index.
SCRIPTS = {"vllm-router": "vllm-router", "sglang-router": "sglang-router"}
# The lines of pip's output shown as progress (all of it goes into a failure's reason).
_PROGRESS = ("Collecting", "Successfully", "ERROR")


class PeerEnvUnavailableError(RuntimeError):
    """The peer routers could not be installed; the message says why."""


def pins() -> dict[str, str]:
    """Package name -> pinned version, from requirements.txt."""
    pinned = {}
    for line in REQUIREMENTS.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            pinned[name.strip()] = version.strip()
    return pinned


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "hetero-router" / "peers"


def venv_dir() -> Path:
    digest = hashlib.sha256(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    digest.update(REQUIREMENTS.read_bytes())
    return cache_dir() / f"venv-{digest.hexdigest()[:12]}"


def installed() -> bool:
    return (venv_dir() / COMPLETE).exists()


def bin_path(script: str) -> Path:
    """A console script of the environment (``vllm-router``, ``sglang-router``)."""
    return venv_dir() / "bin" / script


def _run(argv: list[str | Path], what: str) -> None:
    """Runs one install step, its output shown as progress lines; raises with its tail."""
    print("  +", " ".join(str(a) for a in argv), flush=True)
    tail: deque[str] = deque(maxlen=6)
    with subprocess.Popen(  # argv built here, no shell
        [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        if process.stdout is None:
            raise RuntimeError("pip was started without stdout=PIPE")
        for line in process.stdout:
            if line.startswith(_PROGRESS):
                print(f"    {line.rstrip()}", flush=True)
            if line.strip() and not line.startswith("WARNING: Location"):
                tail.append(line.strip())
    if process.returncode != 0:
        raise PeerEnvUnavailableError(
            f"{what} failed (exit {process.returncode}): " + " | ".join(tail)
        )


def install() -> Path:
    """Installs the environment unless it is complete; returns its bin folder."""
    venv = venv_dir()
    if (venv / COMPLETE).exists():
        return venv / "bin"
    if venv.exists():
        print(f"removing the incomplete peer environment {venv}", flush=True)
        shutil.rmtree(venv)
    started = time.monotonic()
    wanted = ", ".join(f"{name}=={version}" for name, version in pins().items())
    print(f"installing the peer routers into {venv} ({wanted})", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        _run([sys.executable, "-m", "venv", venv], "making the virtual environment")
        py = venv / "bin" / "python"
        pip: list[str | Path] = [py, "-m", "pip", "--disable-pip-version-check", "--no-input"]
        _run([*pip, "install", "--progress-bar", "off", "-r", REQUIREMENTS], "pip install")
        for script in SCRIPTS.values():
            if not bin_path(script).exists():
                raise PeerEnvUnavailableError(f"the install has no `{script}` script")
    except (OSError, PeerEnvUnavailableError) as failure:
        shutil.rmtree(venv, ignore_errors=True)
        if isinstance(failure, PeerEnvUnavailableError):
            raise
        raise PeerEnvUnavailableError(f"could not install the peer routers: {failure}") from None
    (venv / COMPLETE).write_text(f"installed in {time.monotonic() - started:.0f} s\n")
    print(f"peer environment ready in {time.monotonic() - started:.0f} s", flush=True)
    return venv / "bin"


def main() -> None:
    parser = argparse.ArgumentParser(description="Install the peer routers' environment.")
    parser.add_argument(
        "--check", action="store_true", help="only say whether it is installed (exit 1 if not)"
    )
    if parser.parse_args().check:
        if not installed():
            print(f"no peer environment at {venv_dir()}", file=sys.stderr)
            sys.exit(1)
        print(venv_dir() / "bin")
        return
    try:
        print(install())
    except PeerEnvUnavailableError as unavailable:
        print(unavailable, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
