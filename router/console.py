"""Tables and progress for people, with rich: the simulator's, the planner's and the
bench's.

A table is rendered whole, with its header, as plain text (no colour, never wrapped:
a terminal and a log read the same), to be printed once on stdout. Progress goes to stderr:
a live bar on a terminal; in a log (no terminal), a line at every tenth of a known
total, or at runs 1, 2, 4, 8, ... of an unknown one, and a last line at the end.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as Bar
from rich.table import Table

_LOGGED_STEPS = 10
# A log has no width: a table there is as wide as its rows, never wrapped.
_LOG_WIDTH = 1000


def table(*columns: str, numeric: Sequence[str] = (), title: str | None = None) -> Table:
    """An empty table with a header of ``columns``; those named in ``numeric`` are
    right-aligned. Add rows with ``add_row`` (strings), print what ``render`` makes."""
    grid = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", header_style="bold")
    for name in columns:
        grid.add_column(name, justify="right" if name in numeric else "left")
    return grid


def render(grid: Table) -> str:
    """The table as the text a log would get: no colour, no wrapping."""
    console = Console(width=_LOG_WIDTH, color_system=None, force_terminal=False)
    with console.capture() as captured:
        console.print(grid, markup=False, highlight=False)
    return "\n".join(line.rstrip() for line in captured.get().splitlines()).strip("\n")


class Progress:
    """How far a long run is, on stderr (``file``), unless ``quiet``.

    ``total`` None: the run's length is unknown (a search that stops when it finds),
    and the count is shown alone. ``note`` says what the last step was."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        quiet: bool = False,
        file: TextIO | None = None,
    ) -> None:
        self._label = label
        self._total = None if total is None else max(total, 1)
        self._done = 0
        self._note = ""
        self._quiet = quiet
        self._started = time.monotonic()
        self._logged: int | None = None  # the count of the last line written to a log
        self._console = Console(file=file if file is not None else sys.stderr, highlight=False)
        self._bar: Bar | None = None
        self._task: TaskID | None = None
        if quiet:
            return
        if self._console.is_terminal:
            self._bar = Bar(
                TextColumn("  {task.description}"),
                BarColumn(),
                MofNCompleteColumn() if self._total is not None else TextColumn("{task.completed}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[note]}"),
                console=self._console,
            )
            self._task = self._bar.add_task(label, total=self._total, note="")
            self._bar.start()
        elif self._total is not None:
            self._log()

    def advance(self, count: int = 1, note: str = "") -> None:
        self.update(self._done + count, note)

    def update(self, done: int, note: str = "") -> None:
        """The run has ``done`` steps behind it; ``note`` tells of the last one."""
        self._done, self._note = done, note
        if self._quiet:
            return
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, note=note)
        elif self._due():
            self._log()

    def close(self) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.stop()
        elif self._logged != self._done:
            self._log()

    def _due(self) -> bool:
        if self._total is None:  # at 1, 2, 4, 8, ...: a few lines however long it runs
            return self._done >= 1 and self._done & (self._done - 1) == 0
        step = math.ceil(self._total / _LOGGED_STEPS)
        last = self._logged or 0
        return self._done >= self._total or self._done - last >= step

    def _log(self) -> None:
        elapsed = time.monotonic() - self._started
        count = f"{self._done}" if self._total is None else f"{self._done}/{self._total}"
        note = f" {self._note}" if self._note else ""
        line = f"  {self._label}: {count} [{elapsed:.0f} s]{note}"
        self._console.file.write(line + "\n")
        self._console.file.flush()
        self._logged = self._done
