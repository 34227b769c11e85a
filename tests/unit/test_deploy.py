"""The deployment files agree with the code: settings exist, pools validate, ports match."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends import registry
from router.settings import Settings, load_pool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def containers(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = document.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def test_every_router_variable_the_manifests_set_is_a_setting() -> None:
    names = [
        variable["name"]
        for document in manifests()
        for container in containers(document)
        for variable in container.get("env", [])
        if variable["name"].startswith("HETERO_ROUTER_")
    ]
    assert names, "no HETERO_ROUTER_ variables found"
    for name in names:
        assert name.removeprefix("HETERO_ROUTER_").lower() in Settings.model_fields, name


def test_router_containers_listen_where_their_ports_say() -> None:
    routers = [c for d in manifests() for c in containers(d) if "hetero-router" in c["image"]]
    assert routers
    for container in routers:
        env = {v["name"]: v["value"] for v in container.get("env", [])}
        ports = {p["containerPort"] for p in container.get("ports", [])}
        http_port = int(env["HETERO_ROUTER_HTTP_ADDRESS"].rpartition(":")[2])
        assert http_port in ports
        grpc_port = int(env["HETERO_ROUTER_GRPC_ADDRESS"].rpartition(":")[2])
        assert grpc_port in ports or env["HETERO_ROUTER_GRPC_ADDRESS"].startswith("127.0.0.1")


def test_the_kustomize_pool_validates_with_known_adapters() -> None:
    pool = load_pool(DEPLOY / "kubernetes" / "base" / "pool.yaml")
    for backend in pool.backends:
        registry.create(backend.kind, backend.id, backend.address, backend.options)


def test_the_vllm_example_pool_validates_with_known_adapters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-example")  # the variable its decode entry names
    pool = load_pool(DEPLOY / "examples" / "vllm-pd" / "pool.yaml")
    assert {backend.kind for backend in pool.backends} == {"vllm"}
    for backend in pool.backends:
        registry.create(backend.kind, backend.id, backend.address, backend.options)


def test_the_vllm_example_runs_a_kv_producer_and_a_consumer_with_a_lease() -> None:
    readme = (DEPLOY / "examples" / "vllm-pd" / "README.md").read_text()
    configs = [json.loads(c) for c in re.findall(r"--kv-transfer-config '([^']*)'", readme)]
    assert [config["kv_role"] for config in configs] == ["kv_producer", "kv_consumer"]
    for config in configs:
        assert config["kv_connector"] == "NixlConnector"
        assert config["kv_load_failure_policy"] == "recompute"
        # Longer than the router's prefill deadline: a prefill answered at its deadline
        # still leaves the decode leg time to queue and read the blocks.
        lease = config["kv_connector_extra_config"]["kv_lease_duration"]
        assert lease > Settings().prefill_timeout_s


def test_the_dockerfile_copies_what_exists() -> None:
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (DEPLOY.parent / source).exists(), source
