"""The kustomize overlays render, validate as the API server would, and say what they mean.

Each overlay of deploy/kubernetes (and the gateway with each optional component) is
rendered with ``kubectl kustomize`` and every object validated strictly (unknown
fields rejected, as ``kubectl apply``'s server-side field validation does) by
kubernetes-validate against the oldest Kubernetes the manifests need and the newest
it ships; the Prometheus Operator's objects against the CRDs vendored in
tests/data/prometheus-operator-crds. There is no API server here: nothing is applied.
Then the rendered objects are read for what the files promise: probes on the health
names the router serves, a grace that covers the drain, hardened pods, selectors that
select the router, least-privilege RBAC, pool and policy files that load.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.api.grpc_server import LIVENESS_SERVICE
from router.client import ROUTER_SERVICE
from router.scheduling.registry import load_policy
from router.settings import PoolConfig, Settings, is_loopback, load_pool

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
CRDS = ROOT / "tests" / "data" / "prometheus-operator-crds"
OVERLAYS = ("base", "sidecar", "gateway", "vllm-pd")
# The gateway with each optional component: rendered from a kustomization of the test's.
COMPONENTS = ("podmonitor", "hpa-requests-running")
# The oldest Kubernetes the manifests need: the preStop sleep action is on by default
# from 1.30 (native sidecars from 1.29, matchLabelKeys from 1.27).
MIN_KUBERNETES = "1.30.0"
RECOMMENDED_LABELS = tuple(
    f"app.kubernetes.io/{name}"
    for name in ("name", "instance", "version", "component", "part-of", "managed-by")
)
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Pod")
DRAIN_MARGIN_S = 5  # after the drain: the pool and the trace exporter close


# -- rendering ----------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not found: the overlays are rendered with `kubectl kustomize`")
    reply = subprocess.run(
        [path, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    version = json.loads(reply.stdout or "{}").get("kustomizeVersion", "")
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < 5:
        pytest.skip(f"kubectl's kustomize is {version or 'unknown'}; the overlays need v5+")
    return path


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    reply = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert reply.returncode == 0, reply.stderr
    return tuple(d for d in yaml.safe_load_all(reply.stdout) if d)


@pytest.fixture(scope="module")
def with_component(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A kustomization per component: the gateway with that component."""
    found = {}
    for component in COMPONENTS:
        directory = tmp_path_factory.mktemp(component)
        # kustomize takes no absolute paths to other kustomizations.
        up = Path(os.path.relpath(KUSTOMIZE, directory))
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [str(up / "gateway")],
            "components": [str(up / "components" / component)],
        }
        (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        found[component] = directory
    return found


def overlay(name: str) -> tuple[dict[str, Any], ...]:
    return render(KUSTOMIZE / name)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


# -- validation ---------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema that, like the API server's strict field
    validation, rejects fields it does not name."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: strict(value) for key, value in schema.items()}
    if (
        converted.get("type") == "object"
        and "properties" in converted
        and "additionalProperties" not in converted
        and not converted.get("x-kubernetes-preserve-unknown-fields")
    ):
        converted["additionalProperties"] = False
    return converted


@functools.cache
def crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> the JSON Schema of each vendored CRD's served versions."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schema = strict(version["schema"]["openAPIV3Schema"])
            schemas[(api_version, crd["spec"]["names"]["kind"])] = schema
    return schemas


def validation_errors(resource: dict[str, Any], kubernetes: str) -> list[str]:
    """What the API server of ``kubernetes`` would refuse in ``resource`` (none: [])."""
    validate = pytest.importorskip(
        "kubernetes_validate.utils", reason="kubernetes-validate not installed (test extra)"
    )
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (test extra)")
    schema = crd_schemas().get((resource["apiVersion"], resource["kind"]))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{'.'.join(map(str, error.path))}: {error.message}"
            for error in validator.iter_errors(resource)
        ]
    try:
        validate.validate(resource, kubernetes, strict=True)
    except validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    except validate.SchemaNotFoundError as error:  # a kind no schema covers: a failure here
        return [error.message]
    return []


def kubernetes_versions() -> list[str]:
    try:
        from kubernetes_validate.utils import latest_version  # noqa: PLC0415 - optional
    except ImportError:
        return [MIN_KUBERNETES]
    return [MIN_KUBERNETES, latest_version()]


def rendered_variants(with_component: dict[str, Path]) -> Iterator[tuple[str, Path]]:
    for name in OVERLAYS:
        yield name, KUSTOMIZE / name
    for component, directory in with_component.items():
        yield f"gateway+{component}", directory
    yield "monitoring", ROOT / "deploy" / "monitoring"


@pytest.mark.parametrize("kubernetes", kubernetes_versions())
def test_every_overlay_renders_and_validates_strictly(
    kubernetes: str, with_component: dict[str, Path]
) -> None:
    kinds = set()
    for name, directory in rendered_variants(with_component):
        objects = render(directory)
        assert objects, name
        for resource in objects:
            kinds.add(resource["kind"])
            errors = validation_errors(resource, kubernetes)
            where = f"{name}: {resource['kind']}/{resource['metadata']['name']}"
            assert not errors, f"{where} on Kubernetes {kubernetes}: {errors}"
    # The Prometheus Operator's objects were among them, checked against their CRDs.
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds


def test_the_validation_refuses_what_the_api_server_refuses() -> None:
    """Each check can fail: a field the API does not have, a ServiceMonitor without the
    selector its CRD requires, a field its CRD does not have."""
    deployment = json.loads(json.dumps(named(overlay("base"), "Deployment", "hetero-router")))
    deployment["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 50051}
    assert validation_errors(deployment, MIN_KUBERNETES)
    monitor = json.loads(json.dumps(named(overlay("gateway"), "ServiceMonitor", "hetero-router")))
    del monitor["spec"]["selector"]
    assert any("selector" in e for e in validation_errors(monitor, MIN_KUBERNETES))
    monitor = json.loads(json.dumps(named(overlay("gateway"), "ServiceMonitor", "hetero-router")))
    monitor["spec"]["endpoints"][0]["scrapeEvery"] = "15s"
    assert validation_errors(monitor, MIN_KUBERNETES)


def test_the_prometheus_operator_crds_are_vendored_with_their_source() -> None:
    for path in sorted(CRDS.glob("*.yaml")):
        header = path.read_text().splitlines()[:3]
        assert "prometheus-operator v0.93.0" in header[0], path.name
        assert header[2].endswith(f"/v0.93.0/example/prometheus-operator-crd/{path.name}")
    assert len(crd_schemas()) == 3


# -- the router's pods --------------------------------------------------------------


def pod_specs(
    objects: tuple[dict[str, Any], ...],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, its pod spec) of every workload."""
    for workload in objects:
        if workload["kind"] in WORKLOADS:
            spec = workload["spec"]
            yield workload, spec["template"]["spec"] if "template" in spec else spec


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def routers(
    objects: tuple[dict[str, Any], ...],
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, router container) of every router container."""
    found = [
        (workload, pod, container)
        for workload, pod in pod_specs(objects)
        for container in containers(pod)
        if container["image"].startswith("hetero-router:")
    ]
    assert found
    return found


def settings_of(container: dict[str, Any]) -> Settings:
    env = {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}
    return Settings(**{k.removeprefix("HETERO_ROUTER_").lower(): v for k, v in env.items()})


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.mark.parametrize("name", OVERLAYS)
def test_router_probes_ask_the_health_names_the_router_serves(name: str) -> None:
    for _, _, container in routers(overlay(name)):
        settings = settings_of(container)
        probes: dict[str, dict[str, Any]] = {
            kind: container[f"{kind}Probe"] for kind in ("startup", "liveness")
        }
        if is_loopback(settings.grpc_address):
            # The kubelet probes the pod's IP: a router on loopback is probed from inside.
            for probe in probes.values():
                command = " ".join(probe["exec"]["command"])
                assert f"127.0.0.1:{port_of(settings.http_address)}/healthz" in command
            continue
        grpc_port = port_of(settings.grpc_address)
        for probe in probes.values():
            assert probe == {**probe, "grpc": {"port": grpc_port, "service": LIVENESS_SERVICE}}
        readiness = container["readinessProbe"]
        assert readiness["grpc"] == {"port": grpc_port, "service": ROUTER_SERVICE}


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_grace_period_covers_the_pre_stop_sleep_and_the_drain(name: str) -> None:
    for _, pod, container in routers(overlay(name)):
        settings = settings_of(container)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        sleep_s = pre_stop.get("seconds", 0)
        if not is_loopback(settings.grpc_address):
            assert sleep_s > 0, f"{name}: the endpoint's removal needs time to spread"
        budget = sleep_s + settings.drain_grace_s + DRAIN_MARGIN_S
        assert pod["terminationGracePeriodSeconds"] >= budget, name


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_pod_is_hardened_and_sized(name: str) -> None:
    for workload, pod in pod_specs(overlay(name)):
        where = f"{name}: {workload['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod.get("enableServiceLinks") is False, where
        mounts_of_volume = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            writable = [
                m["mountPath"]
                for m in container.get("volumeMounts", [])
                if "emptyDir" in mounts_of_volume[m["name"]] and not m.get("readOnly")
            ]
            assert "/tmp" in writable, f"{where}: a read-only root needs a writable /tmp"
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_carries_the_recommended_labels(name: str) -> None:
    for resource in overlay(name):
        labels = resource["metadata"].get("labels", {})
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, f"{name}: {resource['kind']}/{resource['metadata']['name']}"
    for workload, _ in pod_specs(overlay(name)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert set(RECOMMENDED_LABELS) <= set(labels), workload["metadata"]["name"]
        # Selectors are immutable: nothing that changes with a release goes in them.
        selector = workload["spec"]["selector"]["matchLabels"]
        assert "app.kubernetes.io/version" not in selector


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("name", [*OVERLAYS, *(f"gateway+{c}" for c in COMPONENTS)])
def test_every_selector_selects_the_pods_it_is_for(
    name: str, with_component: dict[str, Path]
) -> None:
    base, _, component = name.partition("+")
    objects = render(with_component[component]) if component else overlay(base)
    pods = {
        workload["metadata"]["name"]: workload["spec"]["template"]["metadata"]["labels"]
        for workload, _ in pod_specs(objects)
    }

    def chosen(selector: dict[str, str]) -> set[str]:
        return {workload for workload, labels in pods.items() if selects(selector, labels)}

    for service in of_kind(objects, "Service"):
        assert chosen(service["spec"]["selector"]) == {service["metadata"]["name"]}, name
    for kind in ("PodDisruptionBudget", "ServiceMonitor", "PodMonitor"):
        for resource in of_kind(objects, kind):
            assert chosen(resource["spec"]["selector"]["matchLabels"]) == {"hetero-router"}
    for workload, pod in pod_specs(objects):
        for spread in pod.get("topologySpreadConstraints", []):
            assert chosen(spread["labelSelector"]["matchLabels"]) == {workload["metadata"]["name"]}
    for scaler in of_kind(objects, "HorizontalPodAutoscaler"):
        target = named(objects, "Deployment", scaler["spec"]["scaleTargetRef"]["name"])
        # Scaled by the HPA: an apply must not reset the count.
        assert "replicas" not in target["spec"], name


def test_the_hpa_component_scales_on_requests_in_flight_too(
    with_component: dict[str, Path],
) -> None:
    scaler = named(
        render(with_component["hpa-requests-running"]), "HorizontalPodAutoscaler", "hetero-router"
    )
    names = [m["pods"]["metric"]["name"] for m in scaler["spec"]["metrics"] if m["type"] == "Pods"]
    assert names == ["hetero_router_num_requests_running"]
    assert scaler["spec"]["metrics"][0]["type"] == "Resource"  # CPU stays


def test_the_podmonitor_component_replaces_the_servicemonitor(
    with_component: dict[str, Path],
) -> None:
    objects = render(with_component["podmonitor"])
    assert not of_kind(objects, "ServiceMonitor")
    [monitor] = of_kind(objects, "PodMonitor")
    ports = {port["name"] for _, _, container in routers(objects) for port in container["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]} <= ports


# -- configuration and access -------------------------------------------------------


def mounted_file(pod: dict[str, Any], container: dict[str, Any], path: Path) -> tuple[str, str]:
    """(ConfigMap or Secret name, key) that ``path`` of ``container`` comes from."""
    [mount] = [m for m in container["volumeMounts"] if path.parent == Path(m["mountPath"])]
    assert "subPath" not in mount, "a subPath mount never sees a changed ConfigMap"
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    source = volume.get("configMap") or volume["secret"]
    return source.get("name") or source["secretName"], path.name


def discovery_supported() -> bool:
    return '"discovery"' in json.dumps(PoolConfig.model_json_schema())


@pytest.mark.parametrize("name", OVERLAYS)
def test_pool_and_policy_come_from_a_configmap_and_load(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = overlay(name)
    for _, pod, container in routers(objects):
        settings = settings_of(container)
        files = {"pool": settings.pool_file, "policy": settings.policy_file}
        for what, path in files.items():
            if path is None:
                continue  # the packaged policy
            config_map, key = mounted_file(pod, container, path)
            text = named(objects, "ConfigMap", config_map)["data"][key]
            (tmp_path / key).write_text(text)
            if what == "policy":
                load_policy(tmp_path / key)
                continue
            if "discovery:" in text and not discovery_supported():
                pytest.skip("this router's pool schema has no discovery entries yet")
            monkeypatch.setenv("VLLM_API_KEY", "sk-example")  # a variable a pool may name
            load_pool(tmp_path / key)  # raises, naming the problem, on a pool it refuses


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_a_router_that_discovers_gets_api_access_and_that_least(name: str) -> None:
    objects = overlay(name)
    for _, pod, container in routers(objects):
        settings = settings_of(container)
        assert settings.pool_file is not None
        config_map, key = mounted_file(pod, container, settings.pool_file)
        discovers = "endpointslices:" in named(objects, "ConfigMap", config_map)["data"][key]
        assert pod["automountServiceAccountToken"] is discovers, name
        if not discovers:
            assert not of_kind(objects, "Role")
            assert not of_kind(objects, "ClusterRole")
            continue
        account = pod["serviceAccountName"]
        [binding] = [
            b
            for b in of_kind(objects, "RoleBinding")
            if {"kind": "ServiceAccount", "name": account} in b["subjects"]
        ]
        role = named(objects, "Role", binding["roleRef"]["name"])
        assert role["rules"] == [
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            }
        ]
        assert not of_kind(objects, "ClusterRole")
        assert not of_kind(objects, "ClusterRoleBinding")


def engine_flags(container: dict[str, Any]) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` arguments, by flag."""
    flags: dict[str, str] = {}
    args = container["args"]
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            flag, equals, value = arg.partition("=")
            if not equals and index + 1 < len(args) and not args[index + 1].startswith("--"):
                value = args[index + 1]
            flags[flag] = value
    return flags


def test_vllm_pd_runs_a_kv_producer_and_consumer_that_publish_kv_events() -> None:
    objects = overlay("vllm-pd")
    roles = {}
    for workload, pod in pod_specs(objects):
        [container] = containers(pod)
        if not container["image"].startswith("vllm/"):
            continue
        flags = engine_flags(container)
        transfer = json.loads(flags["--kv-transfer-config"])
        roles[workload["metadata"]["name"]] = transfer["kv_role"]
        assert transfer["kv_connector"] == "NixlConnector"
        assert transfer["kv_load_failure_policy"] == "recompute"
        lease = transfer["kv_connector_extra_config"]["kv_lease_duration"]
        assert lease > Settings().prefill_timeout_s
        events = json.loads(flags["--kv-events-config"])
        assert events["enable_kv_cache_events"] is True
        assert events["publisher"] == "zmq"
        declared = {port["containerPort"]: port["name"] for port in container["ports"]}
        service = named(objects, "Service", workload["metadata"]["name"])
        served = {port["name"] for port in service["spec"]["ports"]}
        for endpoint in (events["endpoint"], events["replay_endpoint"]):
            assert declared[port_of(endpoint)] in served, f"{endpoint}: not on the Service"
    assert roles == {"vllm-prefill": "kv_producer", "vllm-decode": "kv_consumer"}


def test_vllm_pd_pool_discovers_the_engine_services_it_names() -> None:
    objects = overlay("vllm-pd")
    pool = yaml.safe_load(named(objects, "ConfigMap", "hetero-router-config")["data"]["pool.yaml"])
    roles = {}
    for entry in pool["backends"]:
        slices = entry["discovery"]["endpointslices"]
        service = named(objects, "Service", slices["service"])
        assert slices["port_name"] in {port["name"] for port in service["spec"]["ports"]}
        roles[slices["service"]] = entry["role"]
    assert roles == {"vllm-prefill": "prefill", "vllm-decode": "decode"}


# -- yamllint -----------------------------------------------------------------------


def test_deploy_is_yamllint_clean() -> None:
    pytest.importorskip("yamllint", reason="yamllint not installed (test extra)")
    reply = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint"), "deploy"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert reply.returncode == 0, reply.stdout + reply.stderr
