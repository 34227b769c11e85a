"""Policies by kebab-case name, and the policy file that composes them.

A policy file has one profile per SLO class; ``default`` is required and serves requests
that name no class. A plugin is written as its name, or as a mapping of its name and
options (``weight`` for scorers)::

    profiles:
      default:
        slo: {ttft_ms: 1000, tpot_ms: 50}
        decider: {name: cost-model}
        filters: [kv-fits]
        scorers:
          - {name: prefix-affinity, weight: 3}
          - {name: queue-depth, weight: 1}
        picker: max-score
        admission: {name: slo-guard, slack: 1.5}

The packaged default is router/defaults/policy.yaml.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from math import inf
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from backends.config_files import problems
from router.errors import ConfigError, shown
from router.scheduling.admission import Admission, AdmitAll, SloGuard
from router.scheduling.deciders import (
    AlwaysSplitDecider,
    CostModelDecider,
    Decider,
    NeverSplitDecider,
    PromptLengthDecider,
)
from router.scheduling.filters import Filter, KvFitsFilter
from router.scheduling.pickers import (
    LeastOutstandingPicker,
    MaxScorePicker,
    Picker,
    PowerOfTwoPicker,
    RoundRobinPicker,
)
from router.scheduling.scheduler import Profile, Scheduler
from router.scheduling.scorers import (
    CostScorer,
    KvUtilizationScorer,
    PredictedLatencyScorer,
    PrefixAffinityScorer,
    QueueDepthScorer,
    RunningRequestsScorer,
    Scorer,
)
from router.scheduling.slo import Slo
from router.settings import Settings, read_yaml

DEFAULT_POLICY_PATH = Path(__file__).resolve().parent.parent / "defaults" / "policy.yaml"

_T = TypeVar("_T")

DECIDERS: dict[str, Callable[..., Decider]] = {
    c.name: c
    for c in (AlwaysSplitDecider, NeverSplitDecider, PromptLengthDecider, CostModelDecider)
}
FILTERS: dict[str, Callable[..., Filter]] = {KvFitsFilter.name: KvFitsFilter}
SCORERS: dict[str, Callable[..., Scorer]] = {
    c.name: c
    for c in (
        PrefixAffinityScorer,
        QueueDepthScorer,
        RunningRequestsScorer,
        KvUtilizationScorer,
        PredictedLatencyScorer,
        CostScorer,
    )
}
PICKERS: dict[str, Callable[..., Picker]] = {
    c.name: c for c in (RoundRobinPicker, LeastOutstandingPicker, PowerOfTwoPicker, MaxScorePicker)
}
ADMISSIONS: dict[str, Callable[..., Admission]] = {c.name: c for c in (AdmitAll, SloGuard)}


class _Plugin(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _as_plugin(value: object) -> object:
    return {"name": value} if isinstance(value, str) else value


class _SloConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)


class _ProfileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    slo: _SloConfig
    decider: _Plugin = _Plugin(name="cost-model")
    filters: list[_Plugin] = Field(default_factory=list)
    scorers: list[_Plugin] = Field(default_factory=list)
    picker: _Plugin = _Plugin(name="max-score")
    admission: _Plugin = _Plugin(name="admit-all")
    split_overhead_ms: float = Field(default=1.0, ge=0)
    sample: int = Field(default=0, ge=0)

    @field_validator("decider", "picker", "admission", mode="before")
    @classmethod
    def _one(cls, value: object) -> object:
        return _as_plugin(value)

    @field_validator("filters", "scorers", mode="before")
    @classmethod
    def _many(cls, value: object) -> object:
        return [_as_plugin(v) for v in value] if isinstance(value, list) else value


class _PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profiles: dict[str, _ProfileConfig]


def load_policy(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Scheduler:
    """The scheduler a policy file describes (None: the packaged default).

    ``overrides`` replace the decider (``decider``), picker (``picker``) or the deciders'
    ``min_prompt_tokens`` in every profile. Raises ConfigError naming the file, profile and
    plugin on anything wrong.
    """
    source = Path(path or DEFAULT_POLICY_PATH)
    return parse_policy(read_yaml(source, "policy"), str(source), overrides)


def parse_policy(
    raw: object, where: str = "policy", overrides: Mapping[str, Any] | None = None
) -> Scheduler:
    try:
        config = _PolicyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{where}: {problems(error, _PolicyConfig)}") from None
    overrides = overrides or {}
    profiles = {
        name: _profile(name, body, f"{where}: profile {name!r}", overrides)
        for name, body in config.profiles.items()
    }
    try:
        return Scheduler(profiles)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from error


def build_scheduler(settings: Settings) -> Scheduler:
    """The daemon's scheduler: the settings' policy file with the settings' overrides."""
    overrides: dict[str, Any] = {}
    if settings.decider is not None:
        overrides["decider"] = settings.decider
    if settings.picker is not None:
        overrides["picker"] = settings.picker
    if settings.split_min_prompt_tokens is not None:
        overrides["min_prompt_tokens"] = settings.split_min_prompt_tokens
    return load_policy(settings.policy_file, overrides)


def _profile(name: str, body: _ProfileConfig, where: str, overrides: Mapping[str, Any]) -> Profile:
    decider = body.decider
    if "decider" in overrides:
        decider = _Plugin(name=overrides["decider"])
    decider_options = decider.options
    if "min_prompt_tokens" in overrides and decider.name in ("prompt-length", "cost-model"):
        decider_options["min_prompt_tokens"] = overrides["min_prompt_tokens"]
    picker = _Plugin(name=overrides["picker"]) if "picker" in overrides else body.picker
    scorers = []
    for spec in body.scorers:
        options = spec.options
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < inf:
            raise ConfigError(f"{where}: scorer {spec.name}: weight must be a number >= 0")
        if weight:
            scorers.append((_make(SCORERS, spec.name, options, "scorer", where), float(weight)))
    return Profile(
        name=name,
        slo=Slo(body.slo.ttft_ms / 1000.0, body.slo.tpot_ms / 1000.0),
        decider=_make(DECIDERS, decider.name, decider_options, "decider", where),
        picker=_make(PICKERS, picker.name, picker.options, "picker", where),
        admission=_make(
            ADMISSIONS, body.admission.name, body.admission.options, "admission", where
        ),
        filters=tuple(_make(FILTERS, f.name, f.options, "filter", where) for f in body.filters),
        scorers=tuple(scorers),
        split_overhead_s=body.split_overhead_ms / 1000.0,
        sample=body.sample,
    )


def _make(
    table: Mapping[str, Callable[..., _T]],
    name: str,
    options: Mapping[str, Any],
    what: str,
    where: str,
) -> _T:
    factory = table.get(name)
    if factory is None:
        known = ", ".join(sorted(table))
        raise ConfigError(f"{where}: unknown {what} {shown(name)}; known: {known}")
    try:
        return factory(**_typed_options(factory, options))
    except ValidationError as error:
        raise ConfigError(f"{where}: {what} {name}: {problems(error)}") from None
    except TypeError as error:
        raise ConfigError(f"{where}: {what} {name}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"{where}: {what} {name}: {error}") from error


def _typed_options(factory: Callable[..., object], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against (and converted to) the types of the plugin's
    constructor: a file's ``slack: .inf`` or ``exempt_priority: x`` fails here, at load,
    not in the middle of a request. TypeError names an option it does not take."""
    parameters = inspect.signature(factory, eval_str=True).parameters.values()
    hints = {
        parameter.name: Any if parameter.annotation is parameter.empty else parameter.annotation
        for parameter in parameters
    }
    for key in options:
        if key not in hints:
            takes = ", ".join(hints) or "none"
            raise TypeError(f"bad option {shown(key)}; it takes: {takes}")
    fields: dict[str, Any] = {key: (hints[key], ...) for key in options}
    checked = create_model("options", __config__=_OPTIONS_CONFIG, **fields).model_validate(
        {key: options[key] for key in fields}
    )
    return {**options, **dict(checked)}


_OPTIONS_CONFIG = ConfigDict(allow_inf_nan=False, strict=True)
