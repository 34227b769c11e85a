"""Discovery's pure parts: the pool file's discovery entries, the mapping of
EndpointSlices' labels and conditions to backends, Kubernetes credentials, and the
file watch that notices a ConfigMap update."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from backends.base import Role
from router.errors import ConfigError
from router.pool.endpointslices import endpoint_backends, slice_fields
from router.pool.filewatch import FileWatch
from router.pool.kube import from_kubeconfig, in_cluster
from router.settings import DiscoveredEntry, EndpointSliceDiscovery, parse_pool
from tests.fake_kube import endpoint_slice, pod_endpoint
from tests.pki import TestCA


def _entry(**fields: Any) -> DiscoveredEntry:
    body = {"id": "engines", "discovery": {"endpointslices": {"service": "vllm"}}, **fields}
    config = parse_pool({"backends": [body]})
    return config.discovered[0]


def _source(entry: DiscoveredEntry) -> EndpointSliceDiscovery:
    assert entry.discovery.endpointslices is not None
    return entry.discovery.endpointslices


def _slices(**slice_options: Any) -> list[dict[str, Any]]:
    return [endpoint_slice("vllm-x", "vllm", [pod_endpoint("vllm-0", "10.0.0.5")], port=8000,
                           **slice_options)]  # fmt: skip


def test_labels_give_the_fields_the_entry_leaves_out_and_annotations_win() -> None:
    labels = {"hetero-router.io/role": "prefill", "hetero-router.io/kind": "vllm",
              "hetero-router.io/model": "from-label", "app": "x"}  # fmt: skip
    annotations = {"hetero-router.io/model": "meta-llama/Llama-3.1-8B",
                   "hetero-router.io/profile": "h100"}  # fmt: skip
    slices = _slices(labels=labels, annotations=annotations)
    assert slice_fields(slices[0]) == {
        "role": "prefill", "kind": "vllm", "model": "meta-llama/Llama-3.1-8B", "profile": "h100",
    }  # fmt: skip
    entry = _entry()
    backends, refused = endpoint_backends(entry, _source(entry), slices)
    assert refused == []
    [backend] = backends
    assert (backend.id, backend.address, backend.role, backend.kind, backend.model) == (
        "engines-vllm-0", "10.0.0.5:8000", Role.PREFILL, "vllm", "meta-llama/Llama-3.1-8B",
    )  # fmt: skip
    assert backend.profile == "h100"


def test_the_entry_fields_win_over_labels() -> None:
    entry = _entry(role="decode", model="m", kind="mock", profile="groq-lpu")
    slices = _slices(labels={"hetero-router.io/role": "prefill"})
    backends, _ = endpoint_backends(entry, _source(entry), slices)
    assert [(b.role, b.model, b.profile) for b in backends] == [(Role.DECODE, "m", "groq-lpu")]


def test_kv_events_endpoints_name_each_backends_own_host() -> None:
    entry = _entry(role="decode", model="m", kv_events={
        "endpoint": "tcp://{host}:5557", "replay_endpoint": "tcp://{host}:5558"})  # fmt: skip
    endpoints = [pod_endpoint("a", "10.0.0.1"), {"addresses": ["fd00::2"], "conditions": {}}]
    slices = [endpoint_slice("s", "vllm", endpoints, port=8000)]
    backends, _ = endpoint_backends(entry, _source(entry), slices)
    assert [
        (b.kv_events.endpoint, b.kv_events.replay_endpoint) for b in backends if b.kv_events
    ] == [
        ("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558"),
        ("tcp://[fd00::2]:5557", "tcp://[fd00::2]:5558"),
    ]


def test_conditions_decide_membership() -> None:
    entry = _entry(role="decode", model="m")
    endpoints = [
        pod_endpoint("ready", "10.0.0.1"),
        pod_endpoint("unknown", "10.0.0.2", ready=None),  # unset: read as ready (the API's advice)
        pod_endpoint("starting", "10.0.0.3", ready=False),
        pod_endpoint("terminating", "10.0.0.4", ready=False, terminating=True),
        pod_endpoint("serving-terminating", "10.0.0.5", ready=True, terminating=True),
    ]
    slices = [endpoint_slice("s", "vllm", endpoints, port=8000)]
    backends, _ = endpoint_backends(entry, _source(entry), slices)
    assert [b.id for b in backends] == ["engines-ready", "engines-unknown"]


def test_ids_without_a_pod_name_and_ipv6_addresses() -> None:
    entry = _entry(role="decode", model="m")
    endpoint = {"addresses": ["fd00::7"], "conditions": {"ready": True}}
    slices = [endpoint_slice("s", "vllm", [endpoint], port=8000)]
    backends, _ = endpoint_backends(entry, _source(entry), slices)
    assert [(b.id, b.address) for b in backends] == [("engines-fd00--7-8000", "[fd00::7]:8000")]


def test_the_named_port_is_used_and_a_slice_without_it_is_said() -> None:
    entry = _entry(role="decode", model="m", discovery={
        "endpointslices": {"service": "vllm", "port_name": "http"}})  # fmt: skip
    http = endpoint_slice("a", "vllm", [pod_endpoint("p", "10.0.0.1")], port=8000,
                          port_name="http")  # fmt: skip
    other = endpoint_slice("b", "vllm", [pod_endpoint("q", "10.0.0.2")], port=9000,
                           port_name="metrics")  # fmt: skip
    backends, refused = endpoint_backends(entry, _source(entry), [http, other])
    assert [b.address for b in backends] == ["10.0.0.1:8000"]
    assert refused == ["slice b: no port named 'http'"]


def test_an_endpoint_whose_labels_make_no_backend_is_refused_in_one_line() -> None:
    entry = _entry()
    slices = _slices(labels={"hetero-router.io/role": "gpu"})
    backends, refused = endpoint_backends(entry, _source(entry), slices)
    assert backends == []
    [line] = refused
    assert line.startswith("slice vllm-x, vllm-0: ")
    assert "role: expected 'prefill', 'decode' or 'both', got 'gpu'" in line
    assert "missing field 'model'" in line


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ({"dns": {"name": "decode.test", "port": 1}}, "DNS records carry no labels: give role"),
        (
            {"dns": {"name": "x", "record": "SRV", "port": 1}, "role": "decode", "model": "m"},
            "SRV records carry their own ports",
        ),
        ({"dns": {"name": "x"}, "role": "decode", "model": "m"}, "A records need the port"),
        ({"dns": {"name": "a..b", "port": 1}, "role": "decode", "model": "m"}, "not a DNS name"),
        ({}, "give exactly one of dns, endpointslices"),
        ({"endpointslices": {}}, "name a service, a label_selector, or both"),
        ({"endpointslices": {"label_selector": "app in x"}}, "not a label selector requirement"),
        ({"endpointslices": {"service": "Vllm_Decode"}}, "not a Kubernetes name"),
    ],
)
def test_bad_discovery_entries_are_one_line(entry: dict[str, Any], said: str) -> None:
    fields: dict[str, Any] = {k: entry.pop(k) for k in ("role", "model") if k in entry}
    body: dict[str, Any] = {"id": "d", "discovery": entry, **fields}
    with pytest.raises(ConfigError) as error:
        parse_pool({"backends": [body]})
    assert said in str(error.value)
    assert "\n" not in str(error.value)


def test_selectors_kubernetes_takes_are_accepted() -> None:
    selector = "app=vllm,hetero-router.io/role in (prefill, decode),!canary,tier!=test"
    entry = _entry(discovery={"endpointslices": {"label_selector": selector}})
    assert entry.discovery.endpointslices is not None
    assert entry.discovery.endpointslices.label_selector == selector


def test_in_cluster_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not in a Kubernetes pod"):
        in_cluster(tmp_path, {})
    (tmp_path / "token").write_text("t0\n")
    (tmp_path / "namespace").write_text("serving")
    (tmp_path / "ca.crt").write_bytes(TestCA(tmp_path).cert_file.read_bytes())
    access = in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                   "KUBERNETES_SERVICE_PORT": "443"})  # fmt: skip
    assert (access.server, access.namespace) == ("https://10.96.0.1:443", "serving")
    assert access.headers() == {"Authorization": "Bearer t0"}
    (tmp_path / "token").write_text("t1")  # bound tokens rotate: read on every request
    assert access.headers() == {"Authorization": "Bearer t1"}


def test_kubeconfig_current_context(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file")
    config = {
        "current-context": "b",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"tokenFile": "token"}},
                  {"name": "x", "user": {"exec": {"command": "aws"}}}],
        "contexts": [{"name": "a", "context": {"cluster": "c", "user": "x"}},
                     {"name": "b", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}],
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    access = from_kubeconfig(path)
    assert (access.server, access.namespace, access.ssl) == ("http://127.0.0.1:1", "ns", False)
    assert access.headers() == {"Authorization": "Bearer from-file"}
    path.write_text(json.dumps({**config, "current-context": "a"}))
    with pytest.raises(ConfigError, match="exec and auth-provider credentials are not supported"):
        from_kubeconfig(path)
    path.write_text(json.dumps({**config, "current-context": "nope"}))
    with pytest.raises(ConfigError, match="no context named 'nope'"):
        from_kubeconfig(path)


def test_a_configmap_update_is_seen_through_its_symlinks(tmp_path: Path) -> None:
    first, second = tmp_path / "..2026_1", tmp_path / "..2026_2"
    first.mkdir()
    second.mkdir()
    (first / "pool.yaml").write_text("one")
    (second / "pool.yaml").write_text("two")
    os.symlink("..2026_1", tmp_path / "..data")
    os.symlink("..data/pool.yaml", tmp_path / "pool.yaml")
    watch = FileWatch(tmp_path / "pool.yaml")
    assert not watch.changed()
    # The kubelet swaps ..data: the path is the same, the file behind it is not.
    os.symlink("..2026_2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watch.changed()
    assert not watch.changed()
    # Touched, same content: no change; gone: no change either.
    os.utime(second / "pool.yaml", ns=(1, 1))
    assert not watch.changed()
    os.remove(tmp_path / "pool.yaml")
    assert not watch.changed()
