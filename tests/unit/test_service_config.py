"""The retry policy the router publishes: one file, packaged for the SDK and copied into
deploy/ for clients in other languages, the two byte for byte the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.client import ROUTER_SERVICE, ChannelConfig, service_config_json

ROOT = Path(__file__).resolve().parents[2]


def test_the_deploy_copy_is_the_packaged_file() -> None:
    packaged = ROOT / "router" / "defaults" / "grpc-service-config.json"
    published = ROOT / "deploy" / "grpc-service-config.json"
    assert published.read_bytes() == packaged.read_bytes(), "copy router/defaults' file to deploy/"
    assert service_config_json() == packaged.read_text()


def test_the_policy_retries_unavailable_only_for_the_router_service() -> None:
    (method,) = json.loads(service_config_json())["methodConfig"]
    assert method["name"] == [{"service": ROUTER_SERVICE}]
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == ChannelConfig().max_attempts == 3


@pytest.mark.parametrize(("attempts", "expected"), [(2, 2), (5, 5)])
def test_the_sdk_sets_its_attempts_in_the_published_policy(attempts: int, expected: int) -> None:
    config = json.loads(ChannelConfig(max_attempts=attempts).service_config())
    published = json.loads(service_config_json())
    policy = config["methodConfig"][0].pop("retryPolicy")
    assert policy == {**published["methodConfig"][0]["retryPolicy"], "maxAttempts": expected}
    assert ("grpc.enable_retries", 1) in ChannelConfig(max_attempts=attempts).options()


def test_one_attempt_has_no_retry_policy_and_retries_off() -> None:
    config = ChannelConfig(max_attempts=1)
    (method,) = json.loads(config.service_config())["methodConfig"]
    assert "retryPolicy" not in method
    assert ("grpc.enable_retries", 0) in config.options()
