"""py-spy profiles of a running router: where its CPU goes under load.

py-spy (the bench extra installs it) samples a live process without changing it:
``py-spy record --pid PID --format raw`` writes collapsed stacks, one line per distinct
stack, ``frame;frame;...;frame count``, outermost first, each frame
``function (file:line)``. :func:`top_frames` folds them by function: its own time (the
samples where it was running, the leaf) and its total time (where it was anywhere on the
stack), each as a share of the active samples (py-spy leaves idle threads out).

With ``--native`` (``record(..., native=True)``) the stacks go on into C: the frames of
extension modules and libc. :func:`by_layer` then says which layer each active sample
ran in (the router's own Python, grpc, the system calls, uvloop, ...), its leaf told by
the file or library it names; a thread waiting in ``epoll_wait`` is idle and left out.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+$")  # a frame's line number, folded away
# What comes before a module's path inside an installed package or the standard library.
_SITE = re.compile(r"^.*/(site-packages|lib/python3\.\d+)/")


def py_spy() -> Path | None:
    """The py-spy beside this Python (the bench extra), else one on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    return Path(found) if found else None


def profile_seconds_refusal(seconds: float) -> str | None:
    """Why a bench tool's ``--profile SECONDS`` cannot run, if it cannot: a negative
    time, or no py-spy to record with. None when it can (0 asks for no profile)."""
    if seconds < 0:
        return "--profile takes a number of seconds, 0 or more"
    if seconds and py_spy() is None:
        return "--profile needs py-spy, which the bench extra installs: pip install -e '.[bench]'"
    return None


def _function(frame: str) -> str:
    """``name (path:line)`` as ``name (short path)``: one entry per function."""
    name, _, where = frame.partition(" (")
    if not where:
        return name
    path = _SITE.sub("", _LINE.sub("", where.removesuffix(")")))
    return f"{name} ({path})"


def _stacks(collapsed: str) -> Iterator[tuple[str, int]]:
    """Each ``stack count`` line of py-spy's collapsed output; other lines are skipped."""
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            yield stack, int(number)


def top_frames(collapsed: str, count: int = 25) -> dict[str, Any]:
    """The functions with the most own and total time in py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for stack, hits in _stacks(collapsed):
        frames = [_function(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        samples += hits
        own[frames[-1]] += hits
        for function in set(frames):
            total[function] += hits

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": function, "share": round(hits / samples, 4)}
            for function, hits in counter.most_common(count)
        ]

    return {"samples": samples, "own": shares(own), "total": shares(total)}


# A native leaf's layer, by what its location names: the first rule that matches wins.
_IDLE = ("epoll_wait", "epoll_pwait")  # a leaf of these names: a thread waiting
_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("grpc", ("cygrpc", "grpc/", "libgrpc")),
    ("uvloop", ("uvloop", "loop.c", "handles/")),
    ("aiohttp (and multidict, yarl)", ("aiohttp/", "multidict", "yarl/")),
    ("protobuf", ("_message", "protobuf", "_upb")),
    ("prometheus_client", ("prometheus_client",)),
    ("logging (structlog, orjson)", ("structlog", "orjson")),
    ("system calls and libc", ("libc.so", "libpthread")),
    ("the router's own Python", ("router/", "backends/")),
    ("CPython", ("libpython", "object.h", "ceval", "Objects/", "Python/")),
)


def _layer(leaf: str) -> str | None:
    """The layer a native leaf ran in; None for an idle one."""
    name, _, where = leaf.partition(" (")
    if name in _IDLE:
        return None
    for layer, marks in _LAYERS:
        if any(mark in where for mark in marks):
            return layer
    return "the standard library and the rest"


def active(collapsed: str) -> str:
    """Native collapsed stacks without the idle ones (a thread waiting in epoll), so that
    :func:`top_frames` of them shares out only the active samples."""
    return "\n".join(
        f"{stack} {hits}"
        for stack, hits in _stacks(collapsed)
        if stack.rsplit(";", 1)[-1].partition(" (")[0] not in _IDLE
    )


def by_layer(collapsed: str) -> dict[str, float]:
    """Each layer's share of the active samples of native collapsed stacks (most first);
    idle samples (a thread waiting in epoll) are left out, and with none active, none."""
    layers: Counter[str] = Counter()
    for stack, hits in _stacks(collapsed):
        layer = _layer(stack.rsplit(";", 1)[-1])
        if layer is not None:
            layers[layer] += hits
    active = sum(layers.values())
    return {layer: round(hits / active, 4) for layer, hits in layers.most_common()}


async def record(
    pid: int, duration_s: float, rate: int, output: Path, *, native: bool = False
) -> str:
    """Starts py-spy on ``pid`` for ``duration_s``; returns its collapsed stacks when it
    has finished (the caller loads the process meanwhile). ``native``: C frames too (py-spy
    then pauses the process for each sample, which slows it). Raises RuntimeError with
    py-spy's words when it cannot sample."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[bench]')")
    how = ["--native"] if native else []
    process = await asyncio.create_subprocess_exec(
        str(binary), "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))),
        "--rate", str(rate), "--format", "raw", "--output", str(output), *how,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, errors = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"py-spy failed ({process.returncode}): {errors.decode()[-500:]}")
    return await asyncio.to_thread(output.read_text)
