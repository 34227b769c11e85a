"""Latency targets: what a request is held to, and the named targets of published studies.

One type for every reader: the policies plan against a request's TTFT and TPOT, the
dispatcher counts requests that met them, and the simulator, planner and benchmarks
judge whole runs by the same limits (plus inter-token gaps and end-to-end time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Slo:
    """Per-request latency limits, in seconds; a limit left at None is not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: float | None = None  # every single gap between two tokens
    e2e_s: float | None = None
    name: str = ""  # how reports refer to it (a preset's key, "custom", ...)
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            limit: float | None = getattr(self, key)
            if limit is not None and not (math.isfinite(limit) and limit > 0):
                where = f"SLO {self.name!r}: " if self.name else ""
                raise ValueError(f"{where}{key} must be finite and > 0, got {limit!r}")

    def met_by(
        self,
        ttft_s: float,
        tpot_s: float | None = None,
        *,
        max_itl_s: float | None = None,
        e2e_s: float | None = None,
    ) -> bool:
        """Whether every set limit holds, inclusively.

        A latency given as None was not measured (a request with one output token has
        no TPOT and no gap) and so cannot violate its limit.
        """
        return (
            _within(ttft_s, self.ttft_s)
            and _within(tpot_s, self.tpot_s)
            and _within(max_itl_s, self.itl_s)
            and _within(e2e_s, self.e2e_s)
        )

    def met_by_arrays(
        self,
        ttft_s: NDArray[np.float64],
        tpot_s: NDArray[np.float64],
        max_itl_s: NDArray[np.float64],
        e2e_s: NDArray[np.float64],
    ) -> NDArray[np.bool_]:
        """:meth:`met_by` of many requests at once. A NaN TPOT or largest gap was not
        measured (one output token) and cannot violate its limit; a NaN TTFT or
        end-to-end latency (no answer) violates every limit set on it."""
        met = np.ones(len(ttft_s), dtype=np.bool_)
        with np.errstate(invalid="ignore"):
            if self.ttft_s is not None:
                met &= ttft_s <= self.ttft_s
            if self.tpot_s is not None:
                met &= ~(tpot_s > self.tpot_s)
            if self.itl_s is not None:
                met &= ~(max_itl_s > self.itl_s)
            if self.e2e_s is not None:
                met &= e2e_s <= self.e2e_s
        return met


def _within(value: float | None, limit: float | None) -> bool:
    return value is None or limit is None or value <= limit


_DISTSERVE = (
    "DistServe (Zhong et al., OSDI'24), Table 1 SLOs, "
    "set from the vLLM/OPT latency of each workload"
)

SLO_PRESETS: dict[str, Slo] = {
    "chatbot": Slo(
        name="chatbot",
        ttft_s=0.25,
        tpot_s=0.1,
        source=f"{_DISTSERVE}: chatbot, OPT-13B on ShareGPT (TTFT 0.25 s, TPOT 0.1 s)",
    ),
    "code": Slo(
        name="code",
        ttft_s=0.125,
        tpot_s=0.2,
        source=f"{_DISTSERVE}: code completion, OPT-66B on HumanEval (TTFT 0.125 s, TPOT 0.2 s)",
    ),
    "summarization": Slo(
        name="summarization",
        ttft_s=15.0,
        tpot_s=0.15,
        source=f"{_DISTSERVE}: summarization, OPT-66B on LongBench (TTFT 15 s, TPOT 0.15 s)",
    ),
    "interactive": Slo(
        name="interactive",
        ttft_s=0.2,
        itl_s=0.025,
        source=(
            "this project's target for streaming chat: first token within 200 ms (the "
            "DistServe authors' example of a chatbot's fast initial response) and no gap over "
            "25 ms, i.e. a steady 40 tokens/s or better, faster than people read"
        ),
    ),
    "sram-decode": Slo(
        name="sram-decode",
        ttft_s=0.5,
        tpot_s=0.005,
        source=(
            "this project's own target, not from a paper: decode at 200 tokens/s per stream "
            "(5 ms TPOT), the pace that justifies routing decode to SRAM-class devices, with "
            "500 ms allowed for prefill on another device and the KV handoff"
        ),
    ),
}
