"""What a fake engine counts of the generation legs it serves, by protocol and role.

A router that claims to split a request must send a prefill leg to the prefill engine
and a decode leg to the decode engine. The fake engines (bench/fake_vllm.py) count every
leg they answer under one of ``KINDS``, and fold the key that pairs the two legs of one
request into a fingerprint per kind:

- vLLM's NIXL sequence: the ``remote_request_id`` a prefill engine issues in its
  ``kv_transfer_params``, and the one a decode leg brings back;
- SGLang's bootstrap: the ``bootstrap_room`` both legs carry.

A fingerprint is the sum, modulo 2**64, of a 64-bit hash of each key, so that it does not
depend on the order the legs came in and a later reading minus an earlier one is the
fingerprint of the legs in between. When the prefill engine's prefill legs and the decode
engine's decode legs of one protocol have equal counts and equal fingerprints, every
decode leg had its own prefill leg (barring a 64-bit collision).

``GET /fake/legs`` on a fake engine answers :meth:`LegCounts.as_json`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

VLLM_PREFILL = "vllm-prefill"
VLLM_DECODE = "vllm-decode"
SGLANG_PREFILL = "sglang-prefill"
SGLANG_DECODE = "sglang-decode"
PLAIN = "plain"  # a generation with no split fields: colocated, or a client straight to it
RENDER = "render"  # vLLM's /v1/completions/render (refused by default, as vLLM 0.32 does)
KINDS = (VLLM_PREFILL, VLLM_DECODE, SGLANG_PREFILL, SGLANG_DECODE, PLAIN, RENDER)

_MODULUS = 1 << 64
# The prefill kind whose legs pair with each decode kind.
PAIRS = {VLLM_DECODE: VLLM_PREFILL, SGLANG_DECODE: SGLANG_PREFILL}


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@dataclass
class LegCounts:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    fingerprints: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    violations: int = 0

    def add(self, kind: str, key: str | None = None) -> None:
        self.counts[kind] += 1
        if key is not None:
            self.fingerprints[kind] = (self.fingerprints[kind] + key_hash(key)) % _MODULUS

    def since(self, earlier: LegCounts) -> LegCounts:
        """The legs counted after ``earlier`` (a reading of the same engine)."""
        return LegCounts(
            {k: self.counts[k] - earlier.counts[k] for k in KINDS},
            {k: (self.fingerprints[k] - earlier.fingerprints[k]) % _MODULUS for k in KINDS},
            self.violations - earlier.violations,
        )

    def plus(self, other: LegCounts) -> LegCounts:
        """These legs and ``other``'s together (readings of separate spells)."""
        return LegCounts(
            {k: self.counts[k] + other.counts[k] for k in KINDS},
            {k: (self.fingerprints[k] + other.fingerprints[k]) % _MODULUS for k in KINDS},
            self.violations + other.violations,
        )

    def as_json(self) -> dict[str, Any]:
        # Fingerprints as strings: JSON readers that hold numbers as doubles lose 64-bit ints.
        return {
            "counts": dict(self.counts),
            "fingerprints": {k: str(v) for k, v in self.fingerprints.items()},
            "violations": self.violations,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> LegCounts:
        return cls(
            {k: int(value["counts"].get(k, 0)) for k in KINDS},
            {k: int(value["fingerprints"].get(k, "0")) for k in KINDS},
            int(value.get("violations", 0)),
        )


@dataclass(frozen=True)
class SplitCheck:
    """Whether ``requests`` sent through a router were each split over the two engines."""

    protocol: str  # "vllm" or "sglang"
    requests: int
    prefill_legs: int
    decode_legs: int
    paired: bool  # the fingerprints agree
    plain_legs: int  # generations sent to either engine unsplit
    renders: int  # render calls on both engines
    violations: int

    @property
    def split(self) -> bool:
        return (
            self.prefill_legs == self.decode_legs == self.requests
            and self.paired
            and self.plain_legs == 0
            and self.violations == 0
        )

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "split": self.split}


def check_split(
    protocol: str, requests: int, prefill_engine: LegCounts, decode_engine: LegCounts
) -> SplitCheck:
    """Judges the legs two engines counted while ``requests`` went through one router."""
    decode_kind = VLLM_DECODE if protocol == "vllm" else SGLANG_DECODE
    prefill_kind = PAIRS[decode_kind]
    return SplitCheck(
        protocol=protocol,
        requests=requests,
        prefill_legs=prefill_engine.counts[prefill_kind],
        decode_legs=decode_engine.counts[decode_kind],
        paired=prefill_engine.fingerprints[prefill_kind] == decode_engine.fingerprints[decode_kind],
        plain_legs=prefill_engine.counts[PLAIN] + decode_engine.counts[PLAIN],
        renders=prefill_engine.counts[RENDER] + decode_engine.counts[RENDER],
        violations=prefill_engine.violations + decode_engine.violations,
    )
