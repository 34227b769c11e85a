"""Cluster files of the simulator: the compact form, the pool form, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.base import Role
from router.errors import ConfigError
from router.settings import default_pool_path
from router.sim.cluster import Cluster, load_cluster, parse_cluster


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_the_compact_form_expands_groups(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
model: llama-3.1-70b
groups:
  - {name: h100-p, profile: h100, role: prefill, count: 4, chips: 4, link_gbps: 100}
  - {name: groq-d, profile: groq-lpu, role: decode, count: 2, prefix_cache_blocks: 1024}
""",
    )
    cluster = load_cluster(path)
    assert cluster.model == "llama-3.1-70b"
    assert [d.id for d in cluster.devices] == [
        "h100-p-0",
        "h100-p-1",
        "h100-p-2",
        "h100-p-3",
        "groq-d-0",
        "groq-d-1",
    ]
    prefill = cluster.devices[0]
    assert prefill.role is Role.PREFILL
    assert prefill.perf.timing.chips == 4
    assert prefill.perf.link_gbps == 100
    assert cluster.devices[-1].prefix_cache_blocks == 1024
    assert cluster.price_per_hour_usd == pytest.approx(
        sum(d.perf.price_per_hour_usd for d in cluster.devices)
    )
    assert cluster.describe() == "4x h100 prefill + 2x groq-lpu decode"


def test_a_compact_cluster_round_trips_through_its_config() -> None:
    raw = {
        "model": "llama-3.1-8b",
        "groups": [
            {"name": "a", "profile": "h100", "role": "prefill", "count": 2, "link_gbps": 100},
            {"name": "b", "profile": "h200", "role": "decode", "count": 3},
        ],
    }
    cluster = parse_cluster(raw)
    again = parse_cluster(cluster.to_config())

    def shape(c: Cluster) -> list[tuple[object, ...]]:
        return [
            (d.id, d.profile, d.role, d.perf.timing.chips, d.perf.link_gbps, d.group)
            for d in c.devices
        ]

    assert shape(again) == shape(cluster)
    assert again.price_per_hour_usd == cluster.price_per_hour_usd


def test_the_packaged_pool_file_is_a_cluster() -> None:
    cluster = load_cluster(default_pool_path())
    assert cluster.model == "llama-3.1-8b"
    assert [d.profile for d in cluster.devices] == ["h100", "h100", "groq-lpu", "groq-lpu"]
    assert [d.role for d in cluster.devices] == [Role.PREFILL] * 2 + [Role.DECODE] * 2


def test_pool_options_size_the_simulated_device() -> None:
    cluster = parse_cluster(
        {
            "backends": [
                {
                    "id": "a",
                    "address": "127.0.0.1:1",
                    "role": "both",
                    "model": "llama-3.1-8b",
                    "profile": "h100",
                    "handoff": "relay",
                    "chips": 2,
                    "options": {"prefix_cache_blocks": 64, "relay_chunk_bytes": 1},
                }
            ]
        }
    )
    (device,) = cluster.devices
    assert device.perf.timing.chips == 2
    assert device.prefix_cache_blocks == 64
    assert device.relay


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: llama-3.1-8b\ngroups: []\n", "groups"),
        (
            "model: llama-3.1-8b\ngroups: [{name: a, profile: h100, role: prefill, colour: red}]\n",
            "groups[0]: unknown field 'colour'",
        ),
        (
            "model: llama-3.1-8b\ngroups: [{name: a, profile: h999, role: prefill}]\n",
            "groups[0].profile: unknown profile 'h999'",
        ),
        (
            "model: llama-9\ngroups: [{name: a, profile: h100, role: prefill}]\n",
            "model: unknown model 'llama-9'",
        ),
        (
            "model: llama-3.1-405b\ngroups: [{name: a, profile: h100, role: prefill, chips: 1}]\n",
            "groups[0]: llama-3.1-405b",
        ),
        (
            "model: llama-3.1-8b\ngroups: [{name: a, profile: h100, role: sideways}]\n",
            "groups[0].role",
        ),
        (
            "model: llama-3.1-8b\ngroups: [{name: a, profile: h100, role: decode, count: 0}]\n",
            "groups[0].count",
        ),
        (
            "model: llama-3.1-8b\ngroups:\n"
            "  - {name: a, profile: h100, role: decode}\n"
            "  - {name: a, profile: h100, role: prefill}\n",
            "group names must be unique",
        ),
        ("[1, 2]\n", "expected a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
        (
            "backends: [{id: a, address: '127.0.0.1:1', role: both, model: llama-3.1-8b}]\n",
            "backends[0].profile",
        ),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_cluster(path)
    assert str(path) in str(raised.value)
    assert message in str(raised.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read cluster file"):
        load_cluster(tmp_path / "absent.yaml")
