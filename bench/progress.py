"""Progress of a bench run on stderr: a bar on a terminal, a line per tenth of the run in
a log. The bench's name for ``router.console.Progress``, one library for every long run."""

from __future__ import annotations

from router.console import Progress

__all__ = ["Progress"]
