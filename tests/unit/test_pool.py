from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from router.errors import ConfigError
from router.metrics import RouterMetrics
from router.pool.registry import Pool
from router.settings import parse_pool


def test_a_role_the_adapter_cannot_take_is_refused_at_start_up() -> None:
    config = parse_pool(
        {"backends": [{"id": "api", "kind": "openai", "address": "h:1", "role": "prefill",
                       "model": "m"}]}
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"a openai backend cannot take the role 'prefill'"):
        Pool(config, RouterMetrics(CollectorRegistry()))


def test_an_unknown_kind_names_the_known_ones() -> None:
    config = parse_pool(
        {"backends": [{"id": "x", "kind": "tpu-magic", "address": "h:1", "role": "decode",
                       "model": "m"}]}
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"unknown backend kind 'tpu-magic'; known: .*mock, openai, sglang, vllm"
    ):
        Pool(config, RouterMetrics(CollectorRegistry()))
