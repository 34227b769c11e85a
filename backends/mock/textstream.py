"""Output text of one sequence: incremental detokenizing and stop strings.

Text that could be the start of a stop string is held back until it is known
not to be one, so a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from backends.mock.model import EOS_ID, TextDecoder


class TextStream:
    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = TextDecoder()
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text released by this token; sets ``stopped`` when a stop string or EOS ends it."""
        if token_id == EOS_ID:
            self.stopped = True
            return self.flush()
        text = self._pending + self._decoder.feed(token_id)
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        held = self._held_suffix(text)
        self._pending = text[len(text) - held :]
        return text[: len(text) - held]

    def flush(self) -> str:
        """Everything still held, at the end of the sequence."""
        text = self._pending + self._decoder.flush()
        self._pending = ""
        return text

    def _held_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - size :]):
                    longest = size
                    break
        return longest
