"""What scheduling reads about a request and what it decides."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from router.scheduling.service_level import DEFAULT_SLO_CLASS
from router.scheduling.slo import Slo


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
    # The request's own targets; None: its SLO class's defaults.
    slo: Slo | None = None
    # Larger is more urgent. Admission sheds lower priorities first.
    priority: int = 0
    # Which policy profile serves it (a name from the policy file).
    slo_class: str = DEFAULT_SLO_CLASS
    # Chained hashes of the prompt's leading blocks (backends.prefix).
    prefix_hashes: tuple[int, ...] = ()
    # Prompt tokens one hashed block covers (its bytes over bytes per token).
    prefix_block_tokens: float = 64.0


@dataclass(frozen=True)
class Prediction:
    """What the performance model expects of a plan."""

    ttft_s: float
    tpot_s: float
    # Dollars the plan's devices cost while serving this request.
    cost_usd: float = 0.0
    # The same device time priced by how busy each device is (its load): what serving
    # the request takes from the others. An idle device's time is nearly free.
    marginal_usd: float = 0.0
    # The load (0 idle .. 1 full) of the device that prefills and of the one that decodes.
    prefill_load: float = 0.0
    decode_load: float = 0.0


class Reason(enum.Enum):
    """Why a plan has its mode: a bounded set, a metric's label."""

    REQUESTED = "requested"  # the request asked for the mode
    POLICY = "policy"  # the decider always (or never) splits
    ONLY_MODE = "only_mode"  # the pool has backends for one mode alone
    PROMPT_LENGTH = "prompt_length"  # the prompt-length rule (no performance model)
    CHEAPER = "cheaper"  # both on time; the lower marginal cost (a split by the margin)
    ON_TIME = "on_time"  # the only mode predicted to meet the SLO
    LESS_LATE = "less_late"  # neither on time; the less late


@dataclass(frozen=True)
class Decision:
    """Why the plan was split or not: the reason and what was predicted of each mode
    (None: that mode was not built, or had no performance model)."""

    reason: Reason
    split: Prediction | None = None
    colocated: Prediction | None = None


@dataclass(frozen=True)
class Plan:
    mode: Mode
    prefill_backend: str  # the colocated backend when not split
    decode_backend: str
    relay: bool = False  # the router moves the KV (else the decode side pulls it)
    # The performance model's expectation; None when no backend of the plan has a model.
    predicted: Prediction | None = None
    # Why this mode (set by the scheduler; None for a plan built outside it).
    decision: Decision | None = field(default=None, compare=False)
