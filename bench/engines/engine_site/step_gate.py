"""A gate on a vLLM engine's steps, worked from outside through one file.

A test that must act while a request is still running (drop the client, kill the
engine) cannot race a CPU engine: on a loaded machine the engine core can make every
token of a request before its own HTTP server has sent the first one. The gate takes
the race away. bench/engines/servers.py starts a ``gated`` server with
``StepGateProcessor`` as a logits processor and ``STEP_GATE_ENV`` naming the gate's
file:

- no file: every step goes through (one failed ``open`` per step);
- a file holding ``N`` (then, so that each file differs from the last, any other
  words): the next ``N`` steps go through, then the engine core waits, polling every
  ``POLL_S``, until the file is removed or its text changes (new text grants its own
  ``N``).

A step is one sampling pass of the engine: one token for each request in the batch.
The engine's server goes on while its core waits, so the tokens already made still
reach the client, and an abort is taken (it is carried out once the core goes on).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEP_GATE_ENV = "HETERO_ROUTER_STEP_GATE"
POLL_S = 0.005


class StepGate:
    """Counts the steps let through since the gate's file last changed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: str | None = None
        self._left = 0

    @classmethod
    def from_environment(cls) -> StepGate:
        named = os.environ.get(STEP_GATE_ENV)
        return cls(Path(named) if named else None)

    def admits(self) -> bool:
        """Whether one more step may go now; a step admitted is counted."""
        if self.path is None:
            return True
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            self._seen = None
            return True
        if text != self._seen:
            self._seen = text
            self._left = granted(text)
        if self._left > 0:
            self._left -= 1
            return True
        return False

    def wait(self, sleep: Callable[[float], object] = time.sleep) -> None:
        """Returns once a step is admitted."""
        while not self.admits():
            sleep(POLL_S)


def granted(text: str) -> int:
    """The steps a gate's file grants: its first word. Anything else grants none, so a
    file a test wrote wrong holds the engine rather than letting it run."""
    words = text.split()
    try:
        return max(0, int(words[0])) if words else 0
    except ValueError:
        return 0


try:
    from vllm.v1.sample.logits_processor import LogitsProcessor
except ImportError:  # not the engine environment: the gate alone is importable
    pass
else:

    class StepGateProcessor(LogitsProcessor):  # type: ignore[misc]  # vLLM is untyped here
        """Waits on the gate before each sampling pass; leaves the logits as they are."""

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            self._gate = StepGate.from_environment()

        def is_argmax_invariant(self) -> bool:
            # vLLM skips argmax-invariant processors for greedy requests; the gate must
            # hold those too.
            return False

        def update_state(self, batch_update: Any) -> None:
            return None

        def apply(self, logits: Any) -> Any:
            self._gate.wait()
            return logits
