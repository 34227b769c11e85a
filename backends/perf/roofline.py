"""How long an emulated accelerator takes to prefill and decode, and how much KV it holds.

A mock device computes with a tiny numpy model but must *take as long as* the hardware it
pretends to be, serving the model size it pretends to serve. This module turns the public
figures in ``profiles.yaml`` into those durations:

- GPU-class parts (``kind: gpu``) follow a roofline. Prefill is compute-bound: FLOPs over the
  deployment's peak times an achieved fraction (MFU). A decode step reads the weights once plus
  the KV of every running sequence, at an achieved fraction (MBU) of peak bandwidth, unless the
  batch's FLOPs take longer.
- SRAM-class parts (``kind: sram``) are latency-bound pipelines; a bandwidth roofline over their
  aggregate SRAM would be absurdly fast. One token costs a fixed overhead, a latency per layer,
  and the bytes on its critical path over the bandwidth that serves it. A batch overlaps in the
  pipeline, so a step stays near-flat until the pipeline is full and then grows with the batch.

Everything here is pure and cheap: parsing happens once in :func:`load_catalog` (the file's
schema is :mod:`backends.perf.profiles_schema`), and :class:`TimingModel` precomputes its
rates so each call is a single pass over its inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
import numpy.typing as npt

from backends.config_files import read_yaml_file
from backends.perf.profiles_schema import PipelineEntry, ProfileEntry, parse_profiles_file

DEFAULT_PROFILES_PATH = Path(__file__).with_name("profiles.yaml")

# The KV cache is kept in BF16 on every device, whatever precision the weights are served in.
KV_BYTES_PER_ELEMENT = 2
# An auto-sized deployment keeps at least this share of its memory free for KV after the weights:
# a deployment that barely holds the weights could not batch, and nobody serves that way.
KV_HEADROOM_FRACTION = 0.4
# Largest deployment auto-sizing will consider; beyond this the model "does not fit".
MAX_AUTO_CHIPS = 4096
# One pipeline stage per transformer layer: all three SRAM vendors map a decoder layer (or a fused
# decoder block) to its own stage, so that many tokens can be in flight at once.
PIPELINE_STAGES_PER_LAYER = 1
# Decode runs at least this long are timed with numpy: a call costs microseconds, a step
# nanoseconds, where a step in Python costs a few hundred.
_VECTOR_STEPS = 32


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the model a device pretends to serve (the real one, not the tiny numpy one)."""

    name: str
    parameters: float
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    weight_bytes_per_param: float  # BF16 = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, per layer, per KV head, in BF16."""
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES_PER_ELEMENT

    @property
    def weight_bytes(self) -> float:
        return self.parameters * self.weight_bytes_per_param

    @property
    def attention_width(self) -> int:
        return self.attention_heads * self.head_dim

    def prefill_flops(self, prompt_tokens: int) -> float:
        """2 FLOPs per parameter per token, plus causal attention.

        Position i attends to i+1 keys; QK^T and AV cost 2 FLOPs per multiply-add each, so a
        layer spends 4 * width * (i+1), summed over the prompt: 2 * width * n * (n+1).
        """
        n = _non_negative(prompt_tokens, "prompt_tokens")
        attention = 2.0 * self.layers * self.attention_width * n * (n + 1)
        return 2.0 * self.parameters * n + attention


@dataclass(frozen=True)
class SramPipeline:
    """Latency parameters of an SRAM-class pipeline (see profiles.yaml for their sources)."""

    token_overhead_s: float
    layer_latency_s: float
    critical_path_bandwidth_bytes_per_s: float
    served_weight_bytes_per_param: float
    deployment_unit_chips: int
    vendor_deployments: Mapping[str, int]  # model name -> chips the vendor serves it on
    published_tokens_per_s: Mapping[str, float]  # model name -> vendor single-stream figure


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator, per chip (a Cerebras "chip" is a wafer, a SambaNova one an RDU socket)."""

    name: str
    display_name: str
    kind: Literal["gpu", "sram"]
    peak_flops: float  # dense BF16/FP16 FLOP/s
    memory_bandwidth_bytes_per_s: float  # of the tier that holds weights and KV
    memory_capacity_bytes: float  # of that same tier
    memory_tier: str
    prefill_mfu: float  # achieved fraction of peak FLOPS when compute-bound
    decode_mbu: float | None  # achieved fraction of peak bandwidth in decode (gpu only)
    kv_usable_fraction: float  # share of the memory left after weights that KV may use
    interconnect_name: str
    interconnect_gbps: float
    price_per_chip_hour_usd: float
    price_basis: str
    power_watts_per_chip: float
    pipeline: SramPipeline | None  # sram only
    sources: dict[str, str]  # numeric field path -> public source


@dataclass(frozen=True)
class Catalog:
    profiles: Mapping[str, DeviceProfile]
    models: Mapping[str, ModelSpec]


class TimingModel:
    """Durations of one deployment: ``chips`` of ``profile`` serving ``model``."""

    def __init__(self, profile: DeviceProfile, model: ModelSpec, chips: int | None = None) -> None:
        pipeline = profile.pipeline
        if (pipeline is None) != (profile.kind == "gpu") or (
            profile.kind == "gpu" and profile.decode_mbu is None
        ):
            raise ValueError(f"{profile.name}: a gpu needs decode_mbu, an sram part a pipeline")
        self.profile = profile
        self.model = model
        served_bytes_per_param = (
            model.weight_bytes_per_param
            if pipeline is None
            else pipeline.served_weight_bytes_per_param
        )
        self.weight_bytes: float = model.parameters * served_bytes_per_param
        self.chips: int = self._auto_chips() if chips is None else self._checked_chips(chips)

        # Rates are precomputed so the per-iteration methods are a single pass over their input.
        self._kv_bytes = float(model.kv_bytes_per_token)
        self._flops_per_token = 2.0 * model.parameters
        self._attention_flops_per_context = 4.0 * model.layers * model.attention_width
        self._flops_rate = self.chips * profile.peak_flops * profile.prefill_mfu
        if pipeline is None:
            mbu = profile.decode_mbu or 1.0  # set for every gpu, checked above
            self._bytes_rate = self.chips * profile.memory_bandwidth_bytes_per_s * mbu
        else:
            bandwidth = pipeline.critical_path_bandwidth_bytes_per_s
            self._token_base_s = (
                pipeline.token_overhead_s
                + model.layers * pipeline.layer_latency_s
                + self.weight_bytes / bandwidth
            )
            self._kv_seconds_per_context = self._kv_bytes / bandwidth
            self._pipeline_depth = model.layers * PIPELINE_STAGES_PER_LAYER
            # KV is per-sequence state in the memory tier (HBM on SambaNova): big batches of long
            # contexts cannot be read faster than that tier's aggregate peak bandwidth.
            self._kv_tier_rate = self.chips * profile.memory_bandwidth_bytes_per_s

    # ------------------------------------------------------------------ public timing

    def prefill_seconds(
        self, prompt_lengths: Sequence[int], cached_lengths: Sequence[int] | None = None
    ) -> float:
        """One batched prefill iteration over these prompts.

        ``cached_lengths`` (one per prompt) are leading tokens whose KV a prefix cache already
        holds: only the rest is computed, attending to the whole prefix.
        """
        flops = 0.0
        longest = 0
        cached = cached_lengths or [0] * len(prompt_lengths)
        for length, hit in zip(prompt_lengths, cached, strict=True):
            if not 0 <= hit <= _non_negative(length, "prompt length"):
                raise ValueError(f"cached length {hit} outside 0..{length}")
            if hit == length:
                continue
            flops += self.model.prefill_flops(length) - self.model.prefill_flops(hit)
            longest = max(longest, length - hit)
        if longest == 0:
            return 0.0
        compute = flops / self._flops_rate
        if self.profile.pipeline is None:
            # Even a short prompt streams every weight once.
            return max(compute, self.weight_bytes / self._bytes_rate)
        # A prompt cannot finish faster than one trip through the pipeline.
        return max(compute, self._sram_token_seconds(longest))

    def prefill_seconds_one(self, tokens: int, cached: int = 0) -> float:
        """:meth:`prefill_seconds` of a single prompt, in closed form (schedulers call it per
        candidate backend, so it avoids building lists)."""
        if tokens <= 0 or cached >= tokens:
            return 0.0
        cached = max(cached, 0)
        linear = self._flops_per_token * (tokens - cached)
        attention = (
            0.5
            * self._attention_flops_per_context
            * (tokens * (tokens + 1) - cached * (cached + 1))
        )
        compute = (linear + attention) / self._flops_rate
        if self.profile.pipeline is None:
            return max(compute, self.weight_bytes / self._bytes_rate)
        return max(compute, self._sram_token_seconds(tokens - cached))

    def decode_step_seconds(self, context_lengths: Sequence[int]) -> float:
        """One continuous-batching iteration: one new token for each running sequence.

        A context length is the number of KV entries that sequence's new token attends to.
        """
        count, total, longest = _tally(context_lengths, "context length")
        return self.decode_step_seconds_of(count, total, longest)

    def decode_step_seconds_of(self, count: int, total: int, longest: int) -> float:
        """:meth:`decode_step_seconds` from a batch's tally: sequences, their summed and longest
        context. Schedulers predict with it without building a list per sequence."""
        if count <= 0:
            return 0.0
        flops = count * self._flops_per_token + total * self._attention_flops_per_context
        compute = flops / self._flops_rate
        if self.profile.pipeline is None:
            read = (self.weight_bytes + total * self._kv_bytes) / self._bytes_rate
            return max(read, compute)
        kv_read = total * self._kv_bytes / self._kv_tier_rate
        return max(self._sram_step_seconds(count, total, longest), compute, kv_read)

    def decode_run_seconds(
        self, count: int, total: int, longest: int, steps: int
    ) -> list[float] | npt.NDArray[np.float64]:
        """:meth:`decode_step_seconds_of` of ``steps`` iterations in a row of a batch that
        neither grows nor shrinks: each gives every sequence one more token, so the summed
        context grows by ``count`` and the longest by one. The same figures, bit for bit,
        as asking step by step, for a fraction of the cost (the simulator's decode runs):
        a list for a short run, a numpy array from ``_VECTOR_STEPS`` steps on."""
        if count <= 0:
            return [0.0] * steps
        if steps >= _VECTOR_STEPS:
            return self._decode_run_vector(count, total, longest, steps)
        per_count = count * self._flops_per_token
        per_context = self._attention_flops_per_context
        flops_rate = self._flops_rate
        durations: list[float] = []
        append = durations.append
        if self.profile.pipeline is None:
            weights, kv_bytes, bytes_rate = self.weight_bytes, self._kv_bytes, self._bytes_rate
            for _ in range(steps):
                compute = (per_count + total * per_context) / flops_rate
                read = (weights + total * kv_bytes) / bytes_rate
                append(max(read, compute))
                total += count
            return durations
        base, per_token_context = self._token_base_s, self._kv_seconds_per_context
        depth, kv_bytes, tier_rate = self._pipeline_depth, self._kv_bytes, self._kv_tier_rate
        all_base = count * base
        for _ in range(steps):
            compute = (per_count + total * per_context) / flops_rate
            slowest = base + longest * per_token_context
            pipelined = slowest + (all_base + total * per_token_context - slowest) / depth
            append(max(pipelined, compute, total * kv_bytes / tier_rate))
            total += count
            longest += 1
        return durations

    def _decode_run_vector(
        self, count: int, total: int, longest: int, steps: int
    ) -> npt.NDArray[np.float64]:
        """:meth:`decode_run_seconds` with numpy: the same operations on each element as the
        scalar formula (sums in another order are the same doubles), so the same figures."""
        totals = np.arange(total, total + count * steps, count, dtype=np.float64)  # exact ints
        compute = totals * self._attention_flops_per_context
        compute += count * self._flops_per_token
        compute /= self._flops_rate
        if self.profile.pipeline is None:
            read = totals * self._kv_bytes
            read += self.weight_bytes
            read /= self._bytes_rate
            return np.maximum(read, compute, out=read)
        base, per_token_context = self._token_base_s, self._kv_seconds_per_context
        slowest = np.arange(longest, longest + steps, dtype=np.float64)
        slowest *= per_token_context
        slowest += base
        pipelined = totals * per_token_context
        pipelined += count * base
        pipelined -= slowest
        pipelined /= self._pipeline_depth
        pipelined += slowest
        kv_read = totals * self._kv_bytes
        kv_read /= self._kv_tier_rate
        np.maximum(pipelined, compute, out=pipelined)
        return np.maximum(pipelined, kv_read, out=pipelined)

    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens the deployment holds: memory left after weights, times the usable share."""
        free = self.chips * self.profile.memory_capacity_bytes - self.weight_bytes
        return max(0, int(free * self.profile.kv_usable_fraction // self._kv_bytes))

    def single_stream_tokens_per_second(self, context_length: int = 1024) -> float:
        return 1.0 / self.decode_step_seconds([context_length])

    # ------------------------------------------------------------------ SRAM pipeline

    def _sram_token_seconds(self, context: int) -> float:
        """Latency of one token through the pipeline, attending ``context`` KV entries."""
        return self._token_base_s + context * self._kv_seconds_per_context

    def _sram_step_seconds(self, count: int, total_context: int, longest: int) -> float:
        """Pipelined batch: the slowest token's full latency, the others one stage apart.

        Near-flat while the batch is smaller than the pipeline depth, then linear in the batch
        once the pipeline is full (throughput of ``depth`` tokens per token-latency).
        """
        slowest = self._sram_token_seconds(longest)
        all_tokens = count * self._token_base_s + total_context * self._kv_seconds_per_context
        return slowest + (all_tokens - slowest) / self._pipeline_depth

    # ------------------------------------------------------------------ deployment size

    def _fits(self, chips: int, headroom: float) -> bool:
        usable = chips * self.profile.memory_capacity_bytes * (1.0 - headroom)
        return self.weight_bytes <= usable

    def _auto_chips(self) -> int:
        pipeline = self.profile.pipeline
        if pipeline is None:
            # Tensor parallelism splits heads and matrices in powers of two.
            sizes: Iterable[int] = (2**k for k in range(MAX_AUTO_CHIPS.bit_length()))
        elif self.model.name in pipeline.vendor_deployments:
            return self._checked_chips(pipeline.vendor_deployments[self.model.name])
        else:
            unit = pipeline.deployment_unit_chips
            sizes = range(unit, MAX_AUTO_CHIPS + 1, unit)
        for chips in sizes:
            if self._fits(chips, KV_HEADROOM_FRACTION):
                return chips
        raise ValueError(
            f"{self.model.name} ({self.weight_bytes / 1e9:.0f} GB of weights) does not fit "
            f"on up to {MAX_AUTO_CHIPS} {self.profile.name} chips with KV headroom"
        )

    def _checked_chips(self, chips: int) -> int:
        if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
            raise ValueError(f"chips must be a positive integer, got {chips!r}")
        if not self._fits(chips, headroom=0.0):
            raise ValueError(
                f"{self.model.name} ({self.weight_bytes / 1e9:.0f} GB of weights) does not fit "
                f"on {chips} {self.profile.name} chip(s) "
                f"({chips * self.profile.memory_capacity_bytes / 1e9:.0f} GB)"
            )
        return chips


def wire_seconds(nbytes: int, *links_gbps: float) -> float:
    """Moving ``nbytes`` over the slowest of the links at its published rate (Gbit/s; a
    link of 0 is unknown and skipped; none known: 0). The mock devices pace transfers by
    it and the scheduler and the simulator predict them with it."""
    size = _non_negative(nbytes, "nbytes")
    known = [link for link in links_gbps if link > 0]
    return size * 8 / (min(known) * 1e9) if known and size else 0.0


def _non_negative(value: int, what: str) -> int:
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def _tally(values: Iterable[int], what: str) -> tuple[int, int, int]:
    """Count, sum and max of non-negative integers in one pass."""
    count = total = largest = 0
    for value in values:
        _non_negative(value, what)
        count += 1
        total += value
        largest = max(largest, value)
    return count, total, largest


# ====================================================================== loading profiles.yaml


def load_catalog(path: Path | None = None) -> Catalog:
    """Profiles and models from ``path`` (default: profiles.yaml beside this module, cached).

    Raises ValueError naming the file and the field path on any unknown, missing or malformed
    field, and on any numeric profile field without an entry in its ``sources``.
    """
    if path is None:
        return _default_catalog()
    return _parse_catalog(Path(path))


@functools.lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    return _parse_catalog(DEFAULT_PROFILES_PATH)


def _parse_catalog(path: Path) -> Catalog:
    raw = read_yaml_file(path, "profiles")  # its DocumentError is a ValueError naming the file
    try:
        entries = parse_profiles_file(raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    models = {
        name: ModelSpec(name=name, **entry.model_dump()) for name, entry in entries.models.items()
    }
    profiles = {name: _device_profile(name, entry) for name, entry in entries.profiles.items()}
    return Catalog(profiles=MappingProxyType(profiles), models=MappingProxyType(models))


def _device_profile(name: str, entry: ProfileEntry) -> DeviceProfile:
    pipeline = entry.pipeline
    return DeviceProfile(
        name=name,
        **entry.model_dump(exclude={"pipeline"}),
        pipeline=None if pipeline is None else _sram_pipeline(pipeline),
    )


def _sram_pipeline(entry: PipelineEntry) -> SramPipeline:
    fields = entry.model_dump(exclude={"vendor_deployments", "published_tokens_per_s"})
    return SramPipeline(
        **fields,
        vendor_deployments=MappingProxyType(dict(entry.vendor_deployments)),
        published_tokens_per_s=MappingProxyType(dict(entry.published_tokens_per_s)),
    )
