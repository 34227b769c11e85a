"""Write the image's lock files from pyproject.toml (and check that they are current).

    python deploy/lock.py              # rewrite them, keeping every pin that still fits
    python deploy/lock.py --upgrade    # move every pin to the newest release that fits
    python deploy/lock.py --check      # exit 1 when a rewrite would change a file

The image (deploy/Dockerfile) installs nothing that these files do not pin, each
download checked against its hashes (``pip install --require-hashes``):

- ``requirements.lock``: the runtime dependencies and the extras the image ships
  (``IMAGE_EXTRAS``), with everything they pull in;
- ``build.lock``: the build backend of ``[build-system]``, which turns the source
  into the wheel the image installs.

They are resolved by ``uv pip compile`` (the test extra installs uv) from the package
index, for the image's Python on Linux. A rewrite prefers the versions a file already
pins, as pip-compile does: a new upstream release changes nothing until
``--upgrade``, so ``--check`` fails only when pyproject.toml changed and the files
were not rewritten (or when an index withdrew a pinned file).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
REQUIREMENTS_LOCK = "requirements.lock"
BUILD_LOCK = "build.lock"
# The extras the image installs beside the runtime dependencies. Not bench (its
# plots and fuzzing) and not the engines tier (bench/engines/requirements.txt).
IMAGE_EXTRAS = ("tracing",)
# The Python of the Dockerfile's base image (tests/unit/test_image.py holds them equal).
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "linux"
# What the header of each file says to run: the Makefile target.
COMPILE_COMMAND = "make lock"


def uv() -> str:
    """uv beside this interpreter (the project's virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        sys.exit("uv not found: install the test extra (make install)")
    return found


def build_requirements() -> str:
    """The ``[build-system] requires`` of pyproject.toml, one per line."""
    requires: list[str] = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    return "".join(f"{requirement}\n" for requirement in requires)


def compile_lock(source: list[str], output: Path, *, stdin: str | None, upgrade: bool) -> None:
    command = [
        uv(),
        "pip",
        "compile",
        *source,
        "--output-file",
        str(output),
        "--generate-hashes",
        "--python-version",
        PYTHON_VERSION,
        "--python-platform",
        PYTHON_PLATFORM,
        "--custom-compile-command",
        COMPILE_COMMAND,
        # The same answer on every machine: no user or project uv.toml.
        "--no-config",
        "--quiet",
    ]
    if upgrade:
        command.append("--upgrade")
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"uv pip compile failed for {output.name}:\n{result.stderr.strip()}")


def write_locks(out: Path, *, upgrade: bool) -> None:
    extras = [argument for extra in IMAGE_EXTRAS for argument in ("--extra", extra)]
    compile_lock([str(PYPROJECT), *extras], out / REQUIREMENTS_LOCK, stdin=None, upgrade=upgrade)
    compile_lock(["-"], out / BUILD_LOCK, stdin=build_requirements(), upgrade=upgrade)


def check() -> int:
    """Rewrites copies of the lock files in a temporary folder; 1 if any changed."""
    stale = 0
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        for name in (REQUIREMENTS_LOCK, BUILD_LOCK):
            if (HERE / name).exists():
                shutil.copy(HERE / name, out / name)  # its pins are the preferences
        write_locks(out, upgrade=False)
        for name in (REQUIREMENTS_LOCK, BUILD_LOCK):
            shipped = (HERE / name).read_text() if (HERE / name).exists() else ""
            current = (out / name).read_text()
            if shipped != current:
                stale = 1
                sys.stderr.writelines(
                    difflib.unified_diff(
                        shipped.splitlines(keepends=True),
                        current.splitlines(keepends=True),
                        f"deploy/{name}",
                        f"deploy/{name} (from pyproject.toml)",
                    )
                )
    if stale:
        print("deploy/*.lock do not match pyproject.toml: run `make lock`", file=sys.stderr)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 when a file would change")
    group.add_argument("--upgrade", action="store_true", help="newest releases that fit")
    options = parser.parse_args()
    if options.check:
        return check()
    write_locks(HERE, upgrade=options.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
