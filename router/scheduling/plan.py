"""What scheduling reads about a request and what it decides."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Disaggregation(enum.Enum):
    AUTO = "auto"
    SPLIT = "split"
    COLOCATED = "colocated"


class Mode(enum.Enum):
    SPLIT = "split"
    COLOCATED = "colocated"


@dataclass(frozen=True)
class RequestFeatures:
    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    disaggregation: Disaggregation
    # Arrival order; pickers break ties with it so equal backends share load.
    sequence: int = 0


@dataclass(frozen=True)
class Plan:
    mode: Mode
    prefill_backend: str  # the colocated backend when not split
    decode_backend: str
    relay: bool = False  # the router moves the KV (else the decode side pulls it)
