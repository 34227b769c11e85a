"""Targets ``pool_file``, ``policy_file`` and ``profiles_file``: the files read at start.

The bytes are written to a file and read by the loader the daemon uses on that file:
:func:`router.settings.load_pool`, :func:`router.scheduling.registry.load_policy` and
:func:`backends.perf.roofline.load_catalog`. Their refusals are ConfigError (pool and
policy files) and ValueError (profiles, as ``load_catalog`` documents), which the CLI
reports in one line; anything else would be a traceback at start-up.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from backends.perf.roofline import load_catalog
from router.errors import ConfigError
from router.scheduling.registry import load_policy
from router.settings import load_pool

POOL_REFUSALS: tuple[type[Exception], ...] = (ConfigError,)
POLICY_REFUSALS: tuple[type[Exception], ...] = (ConfigError,)
PROFILES_REFUSALS: tuple[type[Exception], ...] = (ValueError,)

# One scratch file per process, rewritten for every input: in the folder the fuzz scenario
# gives (and removes), else the temporary folder. libFuzzer ends the process without running
# atexit, which is why the scenario names a folder of its own.
SCRATCH_ENV = "HETERO_ROUTER_FUZZ_SCRATCH"
_SCRATCH = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()) / f"fuzz-{os.getpid()}.yaml"
atexit.register(_SCRATCH.unlink, missing_ok=True)


def _scratch(data: bytes) -> Path:
    _SCRATCH.write_bytes(data)
    return _SCRATCH


def one_input_pool_file(data: bytes) -> None:
    try:
        load_pool(_scratch(data))
    except POOL_REFUSALS:
        return


def one_input_policy_file(data: bytes) -> None:
    try:
        load_policy(_scratch(data))
    except POLICY_REFUSALS:
        return


def one_input_profiles_file(data: bytes) -> None:
    try:
        load_catalog(_scratch(data))
    except PROFILES_REFUSALS:
        return
