"""A progress bar for long runs, on stderr; one line per 10% when stderr is not a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last_decile = -1

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._tty:
            filled = int(30 * self.done / self.total)
            elapsed = time.monotonic() - self._started
            sys.stderr.write(
                f"\r  {self.label:<28} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{self.done}/{self.total} {elapsed:5.1f}s"
            )
            sys.stderr.flush()
            return
        decile = 10 * self.done // self.total
        if decile != self._last_decile:
            self._last_decile = decile
            print(f"  {self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
