"""What one mock device is: the hardware it emulates, its roles, its KV layout and limits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from backends import kvlayout
from backends.base import KVLayout, Role
from backends.kv_events import DEFAULT_TOPIC
from backends.mock.errors import DeviceError
from backends.mock.lease import DEFAULT_KV_LEASE_S
from backends.mock.model import TinyConfig
from backends.perf.roofline import TimingModel, load_catalog

BLOCK_SIZE = 16


@dataclass(frozen=True)
class DeviceConfig:
    backend_id: str
    profile: str
    model: str
    roles: tuple[Role, ...] = (Role.PREFILL, Role.DECODE)
    time_scale: float = 1.0
    kv_lease_s: float = DEFAULT_KV_LEASE_S
    kv_capacity_tokens: int | None = None  # None: what the emulated hardware holds
    decode_step_s: float | None = None  # fixed pace instead of the roofline step
    # Prompt blocks (64 tokens) a prefix cache remembers; a prefill of a cached head is
    # charged for the rest of its prompt only. 0: no prefix cache.
    prefix_cache_blocks: int = 0
    # Chips of the profile the emulated deployment spans; None: the fewest that hold it.
    chips: int | None = None
    # When the KV cannot be had (lease gone, prefill device down, checksum wrong):
    # "retry" pulls it again (up to KV_PULL_ATTEMPTS) then prefills here,
    # "recompute" prefills the prompt here at once, "fail" ends the request.
    kv_failure_policy: Literal["retry", "recompute", "fail"] = "recompute"
    # KV layout: ranks the KV heads split over, and tokens per block.
    tensor_parallel: int = 1
    block_size: int = BLOCK_SIZE
    # Pad leased KV with seeded bytes to the emulated model's size, so transfers
    # move real volumes (benchmarks); the pad is checked, not used.
    emulate_kv_size: bool = False
    # Serve KV bytes on a plain socket beside gRPC (handles name it); off: FetchKV only.
    kv_data_plane: bool = True
    # Fault injection for tests: break the first N data plane transfers midway.
    break_kv_transfers: int = 0
    # Fault injection for tests: flip one bit in each of the first N KV transfers served.
    corrupt_kv_chunks: int = 0
    # KV cache events (vLLM's format, backends.kv_events): the prefix cache's changes on
    # a ZMQ PUB socket on this port, and replays of them on the replay port, both on the
    # device's host. None: no events; 0: a free port.
    kv_events_port: int | None = None
    kv_events_replay_port: int = 0
    kv_events_topic: str = DEFAULT_TOPIC
    # Fault injection for tests: the first N event batches reach the replay buffer only.
    drop_kv_event_batches: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        # ValueError: the device command says it in one line and exits 2.
        for name in ("time_scale", "kv_lease_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("kv_events_port", "kv_events_replay_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be a port number (0-65535), got {port}")
        if self.decode_step_s is not None and not (
            math.isfinite(self.decode_step_s) and self.decode_step_s > 0
        ):
            raise ValueError(f"decode_step_s must be a finite number > 0, got {self.decode_step_s}")


def timing_of(config: DeviceConfig) -> TimingModel:
    """The roofline timing of the configured hardware and model; ValueError for unknown ones."""
    catalog = load_catalog()
    if config.profile not in catalog.profiles:
        known = ", ".join(sorted(catalog.profiles))
        raise ValueError(f"unknown device profile {config.profile!r}; known: {known}")
    if config.model not in catalog.models:
        known = ", ".join(sorted(catalog.models))
        raise ValueError(f"unknown model {config.model!r}; known: {known}")
    return TimingModel(catalog.profiles[config.profile], catalog.models[config.model], config.chips)


def layout_of(config: DeviceConfig, model: TinyConfig) -> KVLayout:
    """The device's KV layout; ValueError for one that cannot hold the model's KV."""
    layout = KVLayout(
        layers=model.layers,
        kv_heads=model.n_kv_heads,
        head_dim=model.head_dim,
        dtype="float32",
        block_size=config.block_size,
        tensor_parallel=config.tensor_parallel,
    )
    reason = kvlayout.incompatibility(layout, layout)
    if reason is not None:
        raise ValueError(reason)
    return layout


def check_role(config: DeviceConfig, role: Role) -> None:
    if role not in config.roles:
        raise DeviceError(
            "FAILED_PRECONDITION",
            f"device {config.backend_id} does not take the {role.value} role",
        )


def check_layout(config: DeviceConfig, own: KVLayout, layout: KVLayout) -> None:
    """Refuses a KV laid out otherwise than ``own``, the device's layout."""
    if layout != own:
        raise DeviceError(
            "FAILED_PRECONDITION",
            f"KV layout mismatch: got {layout.describe()}, "
            f"device {config.backend_id} uses {own.describe()}",
        )
