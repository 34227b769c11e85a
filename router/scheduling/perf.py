"""The performance model scheduling predicts with: the mock devices' own timing model.

A backend whose ``profile`` names a catalogue entry (backends/perf/profiles.yaml) gets a
:class:`DevicePerf`: prefill and decode durations from the roofline of that hardware serving
that model, its link speed, and its price and power from the catalogue (each with a source).
Real engines are predicted the same way when the pool file says what hardware they run on.
The simulator (router/sim) times its devices with the very same objects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from backends.perf.roofline import TimingModel, load_catalog, wire_seconds

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class DevicePerf:
    """Durations, capacity and cost of one deployment (``timing.chips`` chips)."""

    timing: TimingModel
    link_gbps: float
    price_per_hour_usd: float
    power_watts: float
    kv_bytes_per_token: int
    kv_capacity_tokens: int

    @property
    def price_per_second_usd(self) -> float:
        return self.price_per_hour_usd / SECONDS_PER_HOUR

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """One prefill of ``tokens`` prompt tokens whose first ``cached`` are in a prefix cache."""
        if tokens <= 0:
            return 0.0
        return self.timing.prefill_seconds([tokens], [min(cached, tokens)])

    def step_s(self, running: int, context_tokens: int) -> float:
        """One decode iteration of ``running`` sequences attending ``context_tokens`` in all."""
        if running <= 0:
            return 0.0
        return self.timing.decode_step_seconds_of(
            running, context_tokens, -(-context_tokens // running)
        )

    def transfer_s(self, tokens: int, to: DevicePerf) -> float:
        """Moving the KV of ``tokens`` prompt tokens to ``to`` over the slower of both links."""
        return wire_seconds(tokens * self.kv_bytes_per_token, self.link_gbps, to.link_gbps)


@functools.lru_cache(maxsize=256)
def perf_for(
    profile: str, model: str, chips: int | None = None, link_gbps: float | None = None
) -> DevicePerf | None:
    """The model of ``chips`` (None: auto-sized) ``profile`` chips serving ``model``.

    None when the catalogue knows neither (a real engine with no ``profile``); raises
    ValueError when it knows both but the model does not fit.
    """
    catalog = load_catalog()
    device = catalog.profiles.get(profile)
    spec = catalog.models.get(model)
    if device is None or spec is None:
        return None
    timing = TimingModel(device, spec, chips)
    return DevicePerf(
        timing=timing,
        link_gbps=device.interconnect_gbps if link_gbps is None else link_gbps,
        price_per_hour_usd=device.price_per_chip_hour_usd * timing.chips,
        power_watts=device.power_watts_per_chip * timing.chips,
        kv_bytes_per_token=spec.kv_bytes_per_token,
        kv_capacity_tokens=timing.kv_capacity_tokens,
    )
