"""Coverage-guided fuzz targets (atheris), one per parser of untrusted input.

Each target module holds ``one_input(data: bytes) -> None``: it feeds ``data`` to a
parser the way the router does, returns when the parser accepts the input or refuses it
the expected way (its ``REFUSALS``), and lets any other exception out: that is a crash.
The functions need no atheris, so tests call them on the seed corpus
(``corpus/<target>/``); :mod:`bench.fuzz.runner` runs one under atheris, and the
``fuzz`` scenario (:mod:`bench.scenarios.fuzz`) runs them all.

This package imports no target: the runner imports it inside atheris' instrumentation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
INSTALL_HINT = "atheris is not installed: pip install -e '.[bench]'"

# Target name -> the module that holds its one_input.
TARGETS: dict[str, str] = {
    "openai_body": "bench.fuzz.openai_body",
    "grpc_request": "bench.fuzz.grpc_request",
    "pool_file": "bench.fuzz.config_files",
    "policy_file": "bench.fuzz.config_files",
    "profiles_file": "bench.fuzz.config_files",
    "backend_replies": "bench.fuzz.backend_replies",
}

OneInput = Callable[[bytes], None]


def load_target(name: str) -> OneInput:
    """The one-input function of target ``name`` (its module is imported now)."""
    module = importlib.import_module(TARGETS[name])
    one_input: OneInput = getattr(module, "one_input_" + name, None) or module.one_input
    return one_input


def corpus_files(name: str) -> list[Path]:
    return sorted(path for path in (CORPUS_DIR / name).iterdir() if path.is_file())
