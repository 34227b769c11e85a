"""A progress bar for long runs, on stderr; one line per 10% when stderr is not a terminal."""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm

_LOGGED_STEPS = 10


class _Lines:
    """A log has no cursor to move back: each refresh of the bar becomes a line of its own."""

    def __init__(self) -> None:
        self._last = ""

    def write(self, text: str) -> None:
        # tqdm pads a refresh to overwrite the previous one, and repeats the last on close.
        line = text.strip("\r\n").rstrip()
        if line and line != self._last:
            sys.stderr.write(f"{line}\n")
            self._last = line

    def flush(self) -> None:
        sys.stderr.flush()


def _logged(total: int) -> dict[str, Any]:
    """tqdm's options for a log: a short line every tenth of the run, however slow a step."""
    return {
        "file": _Lines(),
        "bar_format": "{desc}: {n_fmt}/{total_fmt} [{elapsed}]",
        "miniters": math.ceil(total / _LOGGED_STEPS),
        "mininterval": 0.0,
        "maxinterval": math.inf,
    }


class Progress:
    def __init__(self, label: str, total: int) -> None:
        total = max(total, 1)
        options = {"file": sys.stderr} if sys.stderr.isatty() else _logged(total)
        self._bar = tqdm(total=total, desc=f"  {label}", **options)

    def advance(self, count: int = 1) -> None:
        self._bar.update(count)

    def close(self) -> None:
        self._bar.close()
