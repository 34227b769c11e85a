"""Timing model of emulated accelerators: calibration against published figures, behaviour, data."""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from backends.perf.roofline import (
    DEFAULT_PROFILES_PATH,
    Catalog,
    DeviceProfile,
    ModelSpec,
    TimingModel,
    load_catalog,
    wire_seconds,
)

GPU_PROFILES = ("h100", "h200", "b200", "mi300x", "trainium2", "inferentia2")
SRAM_PROFILES = ("groq-lpu", "cerebras-wse3", "sambanova-sn40l")
MODELS_8B_70B = ("llama-3.1-8b", "llama-3.1-70b")


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def timing(catalog: Catalog, profile: str, model: str, chips: int | None = None) -> TimingModel:
    return TimingModel(catalog.profiles[profile], catalog.models[model], chips)


# ---------------------------------------------------------------------- calibration

# Vendor single-stream figures (output tokens/s, Llama 3.1, ~1k-token context) the brief names.
PUBLISHED_SINGLE_STREAM = [
    ("groq-lpu", "llama-3.1-70b", 250.0),
    ("groq-lpu", "llama-3.1-8b", 750.0),
    ("cerebras-wse3", "llama-3.1-70b", 450.0),
    ("cerebras-wse3", "llama-3.1-8b", 1800.0),
    ("sambanova-sn40l", "llama-3.1-70b", 457.0),
    ("sambanova-sn40l", "llama-3.1-8b", 1042.0),
    ("sambanova-sn40l", "llama-3.1-405b", 129.0),
]


@pytest.mark.parametrize(("profile", "model", "published"), PUBLISHED_SINGLE_STREAM)
def test_sram_single_stream_within_10_percent_of_vendor_figure(
    catalog: Catalog, profile: str, model: str, published: float
) -> None:
    speed = timing(catalog, profile, model).single_stream_tokens_per_second(1024)
    assert speed == pytest.approx(published, rel=0.10)


def test_sram_fits_reproduce_every_published_figure_in_the_yaml(catalog: Catalog) -> None:
    for name in SRAM_PROFILES:
        pipeline = catalog.profiles[name].pipeline
        assert pipeline is not None
        assert pipeline.published_tokens_per_s, name
        for model, published in pipeline.published_tokens_per_s.items():
            speed = timing(catalog, name, model).single_stream_tokens_per_second(1024)
            assert speed == pytest.approx(published, rel=0.10), (name, model)


@pytest.mark.parametrize("profile", GPU_PROFILES)
@pytest.mark.parametrize("model", MODELS_8B_70B)
def test_gpu_prefill_achieves_50_to_60_percent_of_peak_flops(
    catalog: Catalog, profile: str, model: str
) -> None:
    deployment = timing(catalog, profile, model)
    seconds = deployment.prefill_seconds([4096])
    achieved = catalog.models[model].prefill_flops(4096) / seconds
    peak = deployment.chips * catalog.profiles[profile].peak_flops
    assert 0.50 <= achieved / peak <= 0.60


@pytest.mark.parametrize("profile", GPU_PROFILES)
@pytest.mark.parametrize("model", MODELS_8B_70B)
def test_gpu_single_stream_decode_achieves_60_to_80_percent_of_peak_bandwidth(
    catalog: Catalog, profile: str, model: str
) -> None:
    deployment = timing(catalog, profile, model)
    context = 1024
    read = deployment.weight_bytes + context * catalog.models[model].kv_bytes_per_token
    achieved = read / deployment.decode_step_seconds([context])
    peak = deployment.chips * catalog.profiles[profile].memory_bandwidth_bytes_per_s
    assert 0.60 <= achieved / peak <= 0.80


def test_sram_parts_are_not_bandwidth_rooflines(catalog: Catalog) -> None:
    """A roofline over aggregate SRAM would be orders of magnitude faster than published."""
    for name in ("groq-lpu", "cerebras-wse3"):
        deployment = timing(catalog, name, "llama-3.1-70b")
        profile = catalog.profiles[name]
        roofline = deployment.chips * profile.memory_bandwidth_bytes_per_s / deployment.weight_bytes
        assert roofline > 20 * deployment.single_stream_tokens_per_second()


# ---------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_gpu_decode_step_grows_with_batch_and_with_context(catalog: Catalog, profile: str) -> None:
    deployment = timing(catalog, profile, "llama-3.1-8b")
    by_batch = [deployment.decode_step_seconds([2048] * batch) for batch in (1, 4, 16, 64, 256)]
    assert by_batch == sorted(by_batch)
    assert by_batch[-1] > by_batch[0]
    by_context = [deployment.decode_step_seconds([context] * 8) for context in (0, 1024, 8192)]
    assert by_context[0] < by_context[1] < by_context[2]


@pytest.mark.parametrize("profile", ["h100", "mi300x", *SRAM_PROFILES])
@pytest.mark.parametrize("steps", [1, 7, 31, 32, 300])
def test_a_decode_run_times_each_step_as_asking_step_by_step_does(
    catalog: Catalog, profile: str, steps: int
) -> None:
    """Bit for bit, below and above the length at which numpy takes over."""
    deployment = timing(catalog, profile, "llama-3.1-70b")
    rng = random.Random(f"{profile}-{steps}")
    for _ in range(20):
        count = rng.randrange(1, 400)
        total = count * rng.randrange(1, 8000) + rng.randrange(count)
        longest = rng.randrange(total // count, 8193)
        expected = [
            deployment.decode_step_seconds_of(count, total + k * count, longest + k)
            for k in range(steps)
        ]
        run = deployment.decode_run_seconds(count, total, longest, steps)
        values = run.tolist() if isinstance(run, np.ndarray) else run
        assert values == expected
        assert all(type(value) is float for value in values)
    assert deployment.decode_run_seconds(0, 0, 0, 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("profile", SRAM_PROFILES)
def test_sram_decode_is_near_flat_until_the_pipeline_fills(catalog: Catalog, profile: str) -> None:
    deployment = timing(catalog, profile, "llama-3.1-70b")
    depth = catalog.models["llama-3.1-70b"].layers
    single = deployment.decode_step_seconds([1024])
    small_batch = deployment.decode_step_seconds([1024] * 4)
    full = deployment.decode_step_seconds([1024] * depth)
    overfull = deployment.decode_step_seconds([1024] * (4 * depth))
    assert single < small_batch <= 1.1 * single
    assert full < overfull
    assert overfull >= 2.0 * full
    assert deployment.decode_step_seconds([8192] * 4) > small_batch


@pytest.mark.parametrize("profile", GPU_PROFILES + SRAM_PROFILES)
def test_prefill_grows_at_least_linearly_with_prompt_length(catalog: Catalog, profile: str) -> None:
    deployment = timing(catalog, profile, "llama-3.1-70b")
    lengths = (8192, 16384, 32768) if profile in SRAM_PROFILES else (1024, 2048, 4096, 8192)
    times = [deployment.prefill_seconds([n]) for n in lengths]
    for shorter, longer in itertools.pairwise(times):
        assert longer >= 2.0 * shorter * (1 - 1e-9)
    assert deployment.prefill_seconds([16]) <= deployment.prefill_seconds([4096])


def test_batched_prefill_costs_the_sum_of_its_prompts_when_compute_bound(catalog: Catalog) -> None:
    deployment = timing(catalog, "h100", "llama-3.1-8b")
    pair = deployment.prefill_seconds([2048, 2048])
    assert pair == pytest.approx(2 * deployment.prefill_seconds([2048]))


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_70b_needs_more_gpu_chips_than_8b(catalog: Catalog, profile: str) -> None:
    small = timing(catalog, profile, "llama-3.1-8b").chips
    large = timing(catalog, profile, "llama-3.1-70b").chips
    assert large > small
    assert all(n & (n - 1) == 0 for n in (small, large)), "tensor parallel sizes are powers of 2"


def test_sram_deployments_follow_the_vendor(catalog: Catalog) -> None:
    assert timing(catalog, "groq-lpu", "llama-3.1-70b").chips == 576
    assert timing(catalog, "cerebras-wse3", "llama-3.1-70b").chips == 4
    assert timing(catalog, "cerebras-wse3", "llama-3.1-8b").chips == 1
    assert timing(catalog, "sambanova-sn40l", "llama-3.1-70b").chips == 16
    # Not published: the smallest whole number of GroqRacks (64 chips) with KV headroom.
    assert timing(catalog, "groq-lpu", "llama-3.1-8b").chips % 64 == 0


@pytest.mark.parametrize("profile", GPU_PROFILES + SRAM_PROFILES)
@pytest.mark.parametrize("model", MODELS_8B_70B)
def test_kv_capacity_is_positive(catalog: Catalog, profile: str, model: str) -> None:
    assert timing(catalog, profile, model).kv_capacity_tokens > 0


@pytest.mark.parametrize("profile", ["groq-lpu", "cerebras-wse3"])
@pytest.mark.parametrize("model", MODELS_8B_70B)
def test_on_chip_sram_parts_hold_less_kv_than_a_gpu_deployment(
    catalog: Catalog, profile: str, model: str
) -> None:
    # SambaNova keeps KV in 1 TB of HBM per 16-RDU rack, so it is not an SRAM-capacity part here.
    sram = timing(catalog, profile, model).kv_capacity_tokens
    assert sram < timing(catalog, "h100", model).kv_capacity_tokens


def test_kv_capacity_is_memory_left_after_weights(catalog: Catalog) -> None:
    deployment = timing(catalog, "h100", "llama-3.1-70b", chips=8)
    free = 8 * 80e9 - catalog.models["llama-3.1-70b"].weight_bytes
    assert deployment.kv_capacity_tokens == int(free * 0.9 // 327680)


def test_more_chips_decode_faster(catalog: Catalog) -> None:
    four = timing(catalog, "h100", "llama-3.1-70b", chips=4).decode_step_seconds([1024])
    eight = timing(catalog, "h100", "llama-3.1-70b", chips=8).decode_step_seconds([1024])
    assert eight == pytest.approx(four / 2)


def test_wire_time_is_the_slowest_known_link(catalog: Catalog) -> None:
    nvlink = catalog.profiles["h100"].interconnect_gbps
    assert wire_seconds(1_000_000_000, nvlink) == pytest.approx(8e9 / 7200e9)
    assert wire_seconds(1_000_000_000, nvlink, 400.0) == pytest.approx(8e9 / 400e9)
    assert wire_seconds(1_000_000_000, 400.0, 0.0) == pytest.approx(8e9 / 400e9)
    assert wire_seconds(0, 400.0) == 0.0
    assert wire_seconds(1_000_000_000) == 0.0  # no link known: not modelled
    with pytest.raises(ValueError, match="nbytes"):
        wire_seconds(-1, 400.0)


def test_single_stream_is_the_inverse_of_one_decode_step(catalog: Catalog) -> None:
    deployment = timing(catalog, "b200", "llama-3.1-8b")
    step = deployment.decode_step_seconds([1024])
    assert deployment.single_stream_tokens_per_second() == pytest.approx(1 / step)


def test_empty_and_zero_inputs(catalog: Catalog) -> None:
    for profile in ("h100", "groq-lpu"):
        deployment = timing(catalog, profile, "llama-3.1-8b")
        assert deployment.prefill_seconds([]) == 0.0
        assert deployment.prefill_seconds([0, 0]) == 0.0
        assert deployment.decode_step_seconds([]) == 0.0
        assert deployment.decode_step_seconds([0]) > 0.0  # the weights are still read
    assert catalog.models["llama-3.1-8b"].prefill_flops(0) == 0.0


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.prefill_seconds([16, -1]),
        lambda t: t.decode_step_seconds([5, -2]),
        lambda t: t.single_stream_tokens_per_second(-10),
        lambda t: t.model.prefill_flops(-3),
    ],
)
@pytest.mark.parametrize("profile", ["h100", "cerebras-wse3"])
def test_negative_inputs_raise(
    catalog: Catalog, profile: str, call: Callable[[TimingModel], object]
) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        call(timing(catalog, profile, "llama-3.1-8b"))


def test_deployments_that_cannot_hold_the_weights_raise(catalog: Catalog) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        timing(catalog, "h100", "llama-3.1-405b", chips=1)
    with pytest.raises(ValueError, match="does not fit"):
        timing(catalog, "cerebras-wse3", "llama-3.1-70b", chips=2)
    with pytest.raises(ValueError, match="positive integer"):
        timing(catalog, "h100", "llama-3.1-8b", chips=0)


def test_profile_kind_must_match_its_parameters(catalog: Catalog) -> None:
    h100 = catalog.profiles["h100"]
    with pytest.raises(ValueError, match="pipeline"):
        TimingModel(dataclasses.replace(h100, kind="sram"), catalog.models["llama-3.1-8b"])
    with pytest.raises(ValueError, match="decode_mbu"):
        TimingModel(dataclasses.replace(h100, decode_mbu=None), catalog.models["llama-3.1-8b"])


def test_methods_are_pure_and_deterministic(catalog: Catalog) -> None:
    deployment = timing(catalog, "sambanova-sn40l", "llama-3.1-70b")
    contexts = [100, 2000, 5000]
    first = deployment.decode_step_seconds(contexts)
    assert deployment.decode_step_seconds(contexts) == first
    assert contexts == [100, 2000, 5000]
    assert deployment.decode_step_seconds(tuple(contexts)) == first
    assert deployment.decode_step_seconds(contexts[::-1]) == first


def test_per_iteration_calls_are_cheap(catalog: Catalog) -> None:
    # Counted, not timed: the Python calls one iteration's timing makes. Each sequence
    # costs one (the check of its length); the rest is a fixed handful, with nothing
    # derived again (reading the catalog alone would take thousands).
    deployment = timing(catalog, "groq-lpu", "llama-3.1-70b")

    def python_calls(batch: list[int]) -> int:
        calls = 0

        def count(frame: object, event: str, arg: object) -> None:
            nonlocal calls
            calls += event == "call"

        sys.setprofile(count)
        try:
            deployment.decode_step_seconds(batch)
            deployment.prefill_seconds(batch[:8])
        finally:
            sys.setprofile(None)
        return calls

    small, large = python_calls(list(range(1, 9))), python_calls(list(range(1, 257)))
    assert large - small == 256 - 8
    assert small < 100


# ---------------------------------------------------------------------- model specs


def test_kv_bytes_per_token_exact(catalog: Catalog) -> None:
    assert catalog.models["llama-3.1-8b"].kv_bytes_per_token == 131072
    assert catalog.models["llama-3.1-70b"].kv_bytes_per_token == 327680


def test_prefill_flops_is_dense_plus_causal_attention(catalog: Catalog) -> None:
    model = catalog.models["llama-3.1-8b"]
    n = 1000
    dense = 2 * model.parameters * n
    attention = 2 * model.layers * model.attention_heads * model.head_dim * n * (n + 1)
    assert model.prefill_flops(n) == pytest.approx(dense + attention)
    assert model.weight_bytes == pytest.approx(2 * 8.03e9, rel=1e-3)


def test_model_spec_is_constructible_directly() -> None:
    spec = ModelSpec("toy", 1e6, 2, 64, 4, 2, 16, 128, 1000, 2.0)
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2


# ---------------------------------------------------------------------- the data file


def test_catalog_has_the_required_entries(catalog: Catalog) -> None:
    assert set(GPU_PROFILES + SRAM_PROFILES) <= set(catalog.profiles)
    assert set(MODELS_8B_70B) <= set(catalog.models)
    for name, profile in catalog.profiles.items():
        assert profile.name == name == name.lower()
        assert profile.kind == ("sram" if name in SRAM_PROFILES else "gpu")
        assert (profile.pipeline is None) == (profile.kind == "gpu")


def test_default_catalog_is_cached() -> None:
    assert load_catalog() is load_catalog()
    assert load_catalog(DEFAULT_PROFILES_PATH) is not load_catalog()


def _numbers(value: object, path: str) -> Iterator[str]:
    """Dotted paths of every number inside a profile (dataclasses and maps walked)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int | float):
        yield path
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _numbers(getattr(value, field.name), f"{path}.{field.name}".lstrip("."))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")


@pytest.mark.parametrize("profile", GPU_PROFILES + SRAM_PROFILES)
def test_every_numeric_field_has_a_source(catalog: Catalog, profile: str) -> None:
    device: DeviceProfile = catalog.profiles[profile]
    numbers = set(_numbers(dataclasses.replace(device, sources={}), ""))
    assert "peak_flops" in numbers
    missing = sorted(numbers - set(device.sources))
    assert not missing, f"{profile}: no source for {missing}"
    assert all(text.strip() for text in device.sources.values())


# ---------------------------------------------------------------------- malformed files


def _raw() -> dict[str, Any]:
    data = yaml.safe_load(DEFAULT_PROFILES_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _drop_source(data: dict[str, Any]) -> None:
    del data["profiles"]["h100"]["sources"]["peak_flops"]


def _string_number(data: dict[str, Any]) -> None:
    data["profiles"]["h100"]["memory_bandwidth_bytes_per_s"] = "3.35e12"


MALFORMATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "missing field",
        lambda d: d["profiles"]["h200"].pop("peak_flops"),
        r"missing field.*peak_flops",
    ),
    ("unknown field", lambda d: d["profiles"]["b200"].update(turbo=True), r"unknown field.*turbo"),
    ("unknown kind", lambda d: d["profiles"]["h100"].update(kind="tpu"), r"kind"),
    ("text where number", _string_number, r"memory_bandwidth_bytes_per_s: expected a number"),
    ("fraction above 1", lambda d: d["profiles"]["h100"].update(prefill_mfu=1.5), r"prefill_mfu"),
    ("missing source", _drop_source, r"without a source.*peak_flops"),
    (
        "sram without pipeline",
        lambda d: d["profiles"]["groq-lpu"].pop("pipeline"),
        r"missing field.*pipeline",
    ),
    (
        "deployment of unknown model",
        lambda d: d["profiles"]["groq-lpu"]["pipeline"]["vendor_deployments"].update(gpt5=8),
        r"unknown model.*gpt5",
    ),
    ("model missing a field", lambda d: d["models"]["llama-3.1-8b"].pop("layers"), r"layers"),
    ("no profiles", lambda d: d.pop("profiles"), r"missing field.*profiles"),
    (
        "nested number without a source",
        lambda d: d["profiles"]["groq-lpu"]["sources"].pop("pipeline.layer_latency_s"),
        r"profiles\.groq-lpu: numeric field\(s\) without a source: \['pipeline\.layer_latency_s'\]",
    ),
    (
        "source of no number",
        lambda d: d["profiles"]["h100"]["sources"].update(turbo_boost="marketing"),
        r"profiles\.h100\.sources: entries for unknown numeric field\(s\): \['turbo_boost'\]",
    ),
    (
        "blank source",
        lambda d: d["profiles"]["h100"]["sources"].update(peak_flops="  "),
        r"profiles\.h100\.sources\.peak_flops: expected a non-empty string",
    ),
    (
        "gpu figure on an sram part",
        lambda d: d["profiles"]["groq-lpu"].update(decode_mbu=0.5),
        r"profiles\.groq-lpu: unknown field 'decode_mbu' for kind 'sram'",
    ),
    (
        "uppercase profile name",
        lambda d: d["profiles"].update(H100=d["profiles"]["h100"]),
        r"profiles\.H100: profile names must be lowercase",
    ),
    (
        "boolean where a count",
        lambda d: d["models"]["llama-3.1-8b"].update(layers=True),
        r"models\.llama-3\.1-8b\.layers: expected a whole number, got True",
    ),
    (
        "infinite figure",
        lambda d: d["profiles"]["h100"].update(peak_flops=float("inf")),
        r"profiles\.h100\.peak_flops: .*finite",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [(m, msg) for _, m, msg in MALFORMATIONS],
    ids=[n for n, *_ in MALFORMATIONS],
)
def test_malformed_file_is_rejected_with_a_clear_message(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = _raw()
    mutate(data)
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as raised:
        load_catalog(path)
    assert str(path) in str(raised.value)


def test_unparseable_or_non_mapping_files_are_rejected(tmp_path: Path) -> None:
    for text in ("profiles: [unclosed", "- just\n- a list\n"):
        path = tmp_path / "bad.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=str(path)):
            load_catalog(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_catalog(tmp_path / "absent.yaml")


def test_unmodified_copy_loads_like_the_default(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(_raw()), encoding="utf-8")
    assert load_catalog(path) == load_catalog()
