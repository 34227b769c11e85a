"""Which part of a request a backend is being chosen for."""

from __future__ import annotations

import enum


class Leg(enum.Enum):
    PREFILL = "prefill"  # the prefill of a split request
    DECODE = "decode"  # the decode of a split request
    COLOCATED = "colocated"  # the whole request on one backend

    # Plain attributes rather than properties: scorers read them per candidate.
    prefills: bool
    decodes: bool


for _leg in Leg:
    _leg.prefills = _leg is not Leg.DECODE
    _leg.decodes = _leg is not Leg.PREFILL
