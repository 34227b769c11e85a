"""The cluster a simulation runs: which devices, what they emulate, what they cost.

Two file forms are read. The pool file of the daemon (``backends:``, one entry per
device) simulates exactly what ``hetero-router up`` would start; the compact form
names groups of identical devices, which is what sizing a cluster of hundreds needs::

    model: llama-3.1-70b
    groups:
      - {name: h100-p, profile: h100, role: prefill, count: 4, chips: 4, link_gbps: 100}
      - {name: groq-d, profile: groq-lpu, role: decode, count: 2}

Every device is timed by the catalogue's roofline (router.scheduling.perf), so a
profile or model the catalogue lacks is an error here rather than a silent guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.base import Role
from backends.config_files import problems
from backends.perf.roofline import load_catalog
from backends.prefix import BLOCK_BYTES
from router.errors import ConfigError, shown
from router.scheduling.perf import DevicePerf, perf_for
from router.settings import parse_pool, read_yaml

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class DeviceGroup(BaseModel):
    """``count`` identical devices, named ``<name>-0`` .. ``<name>-<count-1>``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, pattern=_NAME_PATTERN)
    profile: str = Field(min_length=1)
    role: Role
    count: int = Field(default=1, ge=1)
    # Chips per device (one deployment); None: the smallest that holds the model.
    chips: int | None = Field(default=None, ge=1)
    # The link KV moves over, Gbit/s; None: the profile's interconnect.
    link_gbps: float | None = Field(default=None, gt=0)
    # Prompt blocks (64 tokens) each device keeps in its prefix cache; 0: no cache.
    prefix_cache_blocks: int = Field(default=0, ge=0)
    handoff: Literal["direct", "relay"] = "direct"


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    groups: tuple[DeviceGroup, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterConfig:
        repeated = sorted(name for name, n in Counter(g.name for g in self.groups).items() if n > 1)
        if repeated:
            raise ValueError(f"group names must be unique, repeated: {', '.join(repeated)}")
        return self


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device."""

    id: str
    role: Role
    model: str
    profile: str
    perf: DevicePerf
    prefix_cache_blocks: int = 0
    relay: bool = False  # its KV moves through the router (the pool file's handoff: relay)
    group: str = ""


@dataclass(frozen=True)
class Cluster:
    """The devices of one simulation and the model its requests ask for."""

    model: str
    devices: tuple[DeviceSpec, ...]
    source: str = "cluster"

    @property
    def price_per_hour_usd(self) -> float:
        return sum(device.perf.price_per_hour_usd for device in self.devices)

    @property
    def power_watts(self) -> float:
        return sum(device.perf.power_watts for device in self.devices)

    def describe(self) -> str:
        """E.g. ``4x h100 prefill + 2x groq-lpu decode`` (devices, not chips)."""
        counts = Counter((d.profile, d.role.value) for d in self.devices)
        return " + ".join(f"{n}x {profile} {role}" for (profile, role), n in counts.items())

    def to_config(self) -> dict[str, Any]:
        """The compact file form of this cluster (one group per run of like devices)."""
        groups: list[dict[str, Any]] = []
        for device in self.devices:
            entry: dict[str, Any] = {
                "name": device.group or device.id,
                "profile": device.profile,
                "role": device.role.value,
                "count": 1,
                "chips": device.perf.timing.chips,
            }
            if device.perf.link_gbps != device.perf.timing.profile.interconnect_gbps:
                entry["link_gbps"] = device.perf.link_gbps
            if device.prefix_cache_blocks:
                entry["prefix_cache_blocks"] = device.prefix_cache_blocks
            if device.relay:
                entry["handoff"] = "relay"
            last = groups[-1] if groups else None
            if last is not None and {**last, "count": 1} == entry:
                last["count"] += 1
            else:
                groups.append(entry)
        return {"model": self.model, "groups": groups}


def load_cluster(path: Path) -> Cluster:
    """Reads a cluster file of either form; ConfigError names the file and the field."""
    return parse_cluster(read_yaml(path, "cluster"), source=str(path))


def parse_cluster(raw: Any, *, source: str = "cluster") -> Cluster:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'groups' (or a pool's 'backends')")
    if "backends" in raw:
        return _from_pool(raw, source)
    try:
        config = ClusterConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {problems(error, ClusterConfig)}") from None
    return build_cluster(config, source=source)


def build_cluster(config: ClusterConfig, *, source: str = "cluster") -> Cluster:
    _check_model(config.model, source, "model")
    devices: list[DeviceSpec] = []
    for index, group in enumerate(config.groups):
        where = f"groups[{index}]"
        perf = _perf(
            group.profile,
            config.model,
            chips=group.chips,
            link_gbps=group.link_gbps,
            source=source,
            where=where,
        )
        devices.extend(
            DeviceSpec(
                id=f"{group.name}-{n}",
                role=group.role,
                model=config.model,
                profile=group.profile,
                perf=perf,
                prefix_cache_blocks=group.prefix_cache_blocks,
                relay=group.handoff == "relay",
                group=group.name,
            )
            for n in range(group.count)
        )
    return Cluster(model=config.model, devices=tuple(devices), source=source)


# Keys of a pool entry's ``options`` the simulator reads; any other is an adapter's own.
_POOL_OPTIONS = ("link_gbps", "prefix_cache_blocks")


def _from_pool(raw: dict[str, Any], source: str) -> Cluster:
    pool = parse_pool(raw, source=source)
    devices = []
    for index, backend in enumerate(pool.backends):
        where = f"backends[{index}]"
        if not backend.profile:
            raise ConfigError(f"{source}: {where}.profile: the simulator needs a profile to time")
        _check_model(backend.model, source, f"{where}.model")
        link_gbps, cache_blocks = _pool_options(backend.options, source, where)
        devices.append(
            DeviceSpec(
                id=backend.id,
                role=backend.role,
                model=backend.model,
                profile=backend.profile,
                perf=_perf(
                    backend.profile,
                    backend.model,
                    chips=backend.chips,
                    link_gbps=link_gbps,
                    source=source,
                    where=where,
                ),
                prefix_cache_blocks=cache_blocks,
                relay=backend.handoff == "relay",
            )
        )
    return Cluster(pool.resolved_default_model, tuple(devices), source)


def _pool_options(options: Mapping[str, Any], source: str, where: str) -> tuple[float | None, int]:
    values: dict[str, Any] = {key: options.get(key) for key in _POOL_OPTIONS}
    for key, value in values.items():
        if value is None:
            continue
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        integral = key != "link_gbps"
        if not numeric or (integral and not isinstance(value, int)) or not 0 <= value < inf:
            raise ConfigError(f"{source}: {where}.options.{key}: expected a number >= 0")
    link = values["link_gbps"]
    return (
        float(link) if link else None,
        int(values["prefix_cache_blocks"] or 0),
    )


def _check_model(model: str, source: str, where: str) -> None:
    models = load_catalog().models
    if model not in models:
        raise ConfigError(
            f"{source}: {where}: unknown model {shown(model)}; known: {', '.join(sorted(models))}"
        )


def _perf(
    profile: str,
    model: str,
    *,
    chips: int | None,
    link_gbps: float | None,
    source: str,
    where: str,
) -> DevicePerf:
    profiles = load_catalog().profiles
    if profile not in profiles:
        raise ConfigError(
            f"{source}: {where}.profile: unknown profile {shown(profile)}; "
            f"known: {', '.join(sorted(profiles))}"
        )
    try:
        perf = perf_for(profile, model, chips, link_gbps)
    except ValueError as error:
        raise ConfigError(f"{source}: {where}: {error}") from error
    if perf is None:  # both names were checked above
        raise ConfigError(f"{source}: {where}: no timing for {profile} serving {model}")
    return perf


def uniform_cluster(
    model: str,
    groups: Sequence[tuple[str, Role, int]],
    *,
    source: str = "plan",
    prefix_cache_share: float = 0.0,
) -> Cluster:
    """A compact cluster of (profile, role, count) groups with default chips and links.

    ``prefix_cache_share`` gives each device a prefix cache of that share of its KV
    capacity (in 64-token blocks; 0: none): the room an engine's free KV blocks give
    its prefix cache, which a device of little memory (an SRAM part) has little of.
    """
    if not 0 <= prefix_cache_share <= 1:
        raise ValueError(f"prefix_cache_share must lie in [0, 1], got {prefix_cache_share!r}")
    config = ClusterConfig(
        model=model,
        groups=tuple(
            DeviceGroup(
                name=f"{profile}-{role.value}",
                profile=profile,
                role=role,
                count=count,
                prefix_cache_blocks=_cache_blocks(profile, model, prefix_cache_share),
            )
            for profile, role, count in groups
            if count > 0
        ),
    )
    return build_cluster(config, source=source)


def _cache_blocks(profile: str, model: str, share: float) -> int:
    perf = perf_for(profile, model) if share else None
    return 0 if perf is None else int(share * perf.kv_capacity_tokens) // BLOCK_BYTES
