"""What profiles.yaml must hold, checked once when it is loaded.

Numbers are strict: YAML 1.1 reads ``3.35e12`` as a string, and a quoted figure must fail
loudly, not be coerced. Every number a profile holds cites a public source in its
``sources`` map, keyed by the number's dotted path (``peak_flops``,
``pipeline.layer_latency_s``, ``pipeline.vendor_deployments.<model>``); the paths are read
off the validated entry, so a field added here needs a source without further code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from backends.config_files import problems
from backends.errors import shown

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Count = Annotated[int, Field(ge=1)]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty string")
    return text


# At least one character that is not white space.
Text = Annotated[str, AfterValidator(_not_blank)]


def _lowercase(name: str) -> str:
    if name != name.lower():
        raise ValueError(f"profile names must be lowercase, got {name!r}")
    return name


ProfileName = Annotated[str, AfterValidator(_lowercase)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelEntry(_Entry):
    """The real model a device pretends to serve: its config.json figures."""

    parameters: Positive
    layers: Count
    hidden_size: Count
    attention_heads: Count
    kv_heads: Count
    head_dim: Count
    intermediate_size: Count
    vocab_size: Count
    weight_bytes_per_param: Positive


class PipelineEntry(_Entry):
    """Latency parameters of an SRAM-class part; maps are keyed by model name."""

    token_overhead_s: NonNegative
    layer_latency_s: Positive
    critical_path_bandwidth_bytes_per_s: Positive
    served_weight_bytes_per_param: Positive
    deployment_unit_chips: Count
    vendor_deployments: dict[str, Count]
    published_tokens_per_s: dict[str, Positive]


class ProfileEntry(_Entry):
    """One accelerator; a gpu has ``decode_mbu``, an sram part a ``pipeline``."""

    display_name: Text
    kind: Literal["gpu", "sram"]
    peak_flops: Positive
    memory_bandwidth_bytes_per_s: Positive
    memory_capacity_bytes: Positive
    memory_tier: Text
    prefill_mfu: Fraction
    decode_mbu: Fraction | None = None
    kv_usable_fraction: Fraction
    interconnect_name: Text
    interconnect_gbps: Positive
    price_per_chip_hour_usd: Positive
    price_basis: Text
    power_watts_per_chip: Positive
    pipeline: PipelineEntry | None = None
    sources: dict[str, Text]

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> ProfileEntry:
        needed, foreign = (
            ("decode_mbu", "pipeline") if self.kind == "gpu" else ("pipeline", "decode_mbu")
        )
        if getattr(self, needed) is None:
            raise ValueError(f"missing field {needed!r} (kind {self.kind!r} needs it)")
        if getattr(self, foreign) is not None:
            raise ValueError(f"unknown field {foreign!r} for kind {self.kind!r}")
        return self


class ProfilesFile(_Entry):
    models: dict[str, ModelEntry]
    profiles: dict[ProfileName, ProfileEntry]

    # The pipeline maps are checked against the models before the sources, so that a map
    # naming an unknown model is reported as that, not as an entry without a source.
    @model_validator(mode="after")
    def _cross_checked(self) -> ProfilesFile:
        for name, profile in self.profiles.items():
            _check_pipeline_models(f"profiles.{name}.pipeline", profile.pipeline, self.models)
            _check_sources(f"profiles.{name}", profile)
        return self


def _check_pipeline_models(
    where: str, pipeline: PipelineEntry | None, models: Mapping[str, ModelEntry]
) -> None:
    if pipeline is None:
        return
    for key in ("vendor_deployments", "published_tokens_per_s"):
        unknown = sorted(set(getattr(pipeline, key)) - set(models))
        if unknown:
            raise ValueError(f"{where}.{key}: unknown model(s) {unknown}; known: {sorted(models)}")


def _check_sources(where: str, profile: ProfileEntry) -> None:
    numbers = set(numeric_paths(profile))
    missing = sorted(numbers - set(profile.sources))
    if missing:
        raise ValueError(f"{where}: numeric field(s) without a source: {missing}")
    stray = sorted(set(profile.sources) - numbers)
    if stray:
        raise ValueError(f"{where}.sources: entries for unknown numeric field(s): {stray}")


def numeric_paths(entry: BaseModel, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every number in ``entry``, nested entries and maps walked."""
    for name in type(entry).model_fields:
        value = getattr(entry, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from numeric_paths(value, f"{path}.")
        elif isinstance(value, Mapping):
            yield from (f"{path}.{key}" for key, item in value.items() if _is_number(item))
        elif _is_number(value):
            yield path


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_profiles_file(raw: object) -> ProfilesFile:
    """The validated file; ValueError lists every problem by its field path."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping with 'models' and 'profiles', got {shown(raw)}")
    try:
        return ProfilesFile.model_validate(raw)
    except ValidationError as error:
        raise ValueError(problems(error, ProfilesFile)) from None
