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
from router.settings import PoolConfig, Settings, is_loopback, load_pool

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


def routers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every router container, with the pod spec it runs in."""
    found = []
    for document in manifests():
        spec = document.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec)
        found += [(c, pod) for c in containers(document) if "hetero-router" in c["image"]]
    assert found
    return found


def settings_of(container: dict[str, Any]) -> Settings:
    env = {v["name"]: v["value"] for v in container.get("env", [])}
    return Settings(**{k.removeprefix("HETERO_ROUTER_").lower(): v for k, v in env.items()})


def test_router_containers_listen_where_their_ports_say() -> None:
    for container, _ in routers():
        settings = settings_of(container)
        ports = {p["containerPort"] for p in container.get("ports", [])}
        for name in ("grpc_address", "http_address"):
            address = getattr(settings, name)
            # A door on loopback is for the pod's own containers: no port to declare.
            assert int(address.rpartition(":")[2]) in ports or is_loopback(address), name


def test_every_router_beyond_loopback_authenticates_its_clients_from_a_secret() -> None:
    for container, pod in routers():
        settings = settings_of(container)
        assert not settings.insecure
        settings.check_exposure()  # would refuse to start otherwise
        if not settings.exposed_doors():
            continue
        # The token file (or the client CA) is mounted from a Secret, not baked in.
        files = [f for f in (settings.auth_token_file, settings.tls_client_ca_file) if f]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for path in files:
            mounts = [
                m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])
            ]
            assert mounts, f"{path} is on no volume"
            assert "secret" in volumes[mounts[0]["name"]], f"{path} is not from a Secret"


@pytest.mark.parametrize(
    "path",
    sorted((DEPLOY / "kubernetes").rglob("pool.yaml")),
    ids=lambda path: path.parent.name,
)
def test_the_kustomize_pools_validate_with_known_adapters(path: Path) -> None:
    if "discovery:" in path.read_text() and '"discovery"' not in json.dumps(
        PoolConfig.model_json_schema()
    ):
        pytest.skip("this router's pool schema has no discovery entries yet")
    pool = load_pool(path)
    for backend in pool.backends:  # those at fixed addresses
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
        # COPY --from=<stage> copies from an earlier stage, not from the repository.
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (DEPLOY.parent / source).exists(), source
