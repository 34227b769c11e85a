"""CPU time and memory of a process and all its descendants, read from /proc (Linux).

A router may be one process (a Rust binary behind a Python launcher, a Python daemon) or
several (workers it forks): :func:`sample` adds up every live process of the tree rooted
at a pid, its children found through ``/proc/<pid>/task/*/children``. CPU time is
``utime + stime`` of each (all of its threads) plus ``cutime + cstime`` (descendants it
has already reaped, whose time moves there when they end), in seconds; memory is the
resident set (``VmRSS``) and its peak (``VmHWM``) of each, summed. ``kernel_cpu_s`` is
the part of the CPU time spent in the kernel (``stime + cstime``): system calls, and on
loopback the receiving side of every TCP write too. A process that ends
while it is read is left out of that reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TreeSample:
    pids: tuple[int, ...]
    cpu_s: float
    rss_bytes: int
    peak_rss_bytes: int  # the sum of each process's own peak: an upper bound of the tree's
    kernel_cpu_s: float = 0.0  # of cpu_s


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (of every one of its threads)."""
    found: list[int] = []
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return found
    for task in tasks:
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants, parents before children."""
    pids, index = [root], 0
    while index < len(pids):
        pids.extend(child for child in children(pids[index]) if child not in pids)
        index += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime + cutime, stime + cstime) of one process, in seconds: user and kernel."""
    stat = (_PROC / str(pid) / "stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces or parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14 to 17.
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + cutime) / _TICKS_PER_S, (stime + cstime) / _TICKS_PER_S


def memory_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in bytes; (0, 0) for a process without memory."""
    rss = peak = 0
    for line in (_PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return rss, peak


def sample(root: int) -> TreeSample:
    """The tree's CPU time and memory now; raises ProcessLookupError if ``root`` is gone."""
    if not (_PROC / str(root)).exists():
        raise ProcessLookupError(f"no process {root}")
    pids: list[int] = []
    cpu = kernel = 0.0
    rss = peak = 0
    for pid in tree(root):
        try:
            user_s, kernel_s = cpu_split(pid)
            pid_rss, pid_peak = memory_bytes(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended while being read
        pids.append(pid)
        cpu += user_s + kernel_s
        kernel += kernel_s
        rss += pid_rss
        peak += pid_peak
    return TreeSample(tuple(pids), cpu, rss, peak, kernel)
