"""EndpointSlice discovery (discovery.k8s.io/v1): list, then watch from the list's
resourceVersion; a watch that ends is made again from the last version seen, one
that expired (410 Gone) lists again, and an API that fails is tried again after a
pause that doubles up to 30 s, the backends kept as they were meanwhile.

An endpoint is a backend while its ``conditions.ready`` is true (or unset, which the
API says to read as ready) and it is not ``terminating``; one that turns
terminating, not ready, or leaves its slice drains. Its id is the entry's id and the
pod's name (``targetRef``), else its address and port. The fields the entry leaves
out (``role``, ``kind``, ``model``, ``profile``) are read from the slice: its
annotation ``hetero-router.io/<field>``, else its label of that name (the
EndpointSlice controller copies a Service's labels onto its slices, so labelling the
Service is enough; a model name with a ``/`` fits only an annotation).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import aiohttp
from pydantic import ValidationError

from backends.config_files import problems
from router.errors import ConfigError
from router.logging import get_logger
from router.pool.kube import (
    ExpiredError,
    KubeAccess,
    KubeClient,
    KubeError,
    from_kubeconfig,
    in_cluster,
)
from router.settings import LABELLED_FIELDS, BackendConfig, DiscoveredEntry, EndpointSliceDiscovery

log = get_logger(__name__)

Publish = Callable[[Sequence[BackendConfig]], Awaitable[None]]

LABEL_PREFIX = "hetero-router.io/"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_BACKOFF_S = 30.0


def _strings(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def slice_fields(obj: Mapping[str, Any]) -> dict[str, str]:
    """The backend fields a slice's annotations and labels give (``hetero-router.io/role``
    and the like; an annotation wins over a label)."""
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    labels, annotations = _strings(metadata.get("labels")), _strings(metadata.get("annotations"))
    fields: dict[str, str] = {}
    for name in LABELLED_FIELDS:
        value = annotations.get(LABEL_PREFIX + name, labels.get(LABEL_PREFIX + name))
        if value:
            fields[name] = value
    return fields


def _port(obj: Mapping[str, Any], port_name: str | None) -> int | None:
    ports = [p for p in obj.get("ports") or [] if isinstance(p, dict)]
    if port_name is not None:
        ports = [p for p in ports if p.get("name") == port_name]
    port = ports[0].get("port") if ports else None
    return (
        port if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else None
    )


def _serving(endpoint: Mapping[str, Any]) -> bool:
    conditions = endpoint.get("conditions")
    conditions = conditions if isinstance(conditions, dict) else {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


def endpoint_backends(
    entry: DiscoveredEntry, config: EndpointSliceDiscovery, slices: Iterable[Mapping[str, Any]]
) -> tuple[list[BackendConfig], list[str]]:
    """The backends the slices' serving endpoints make, and a line for each endpoint
    or slice that makes none it should (a missing role, a port not found)."""
    backends: dict[str, BackendConfig] = {}
    refused: list[str] = []
    for obj in slices:
        name = str((obj.get("metadata") or {}).get("name", "?"))
        port = _port(obj, config.port_name)
        if port is None:
            wanted = f"named {config.port_name!r}" if config.port_name else "at all"
            refused.append(f"slice {name}: no port {wanted}")
            continue
        fields = slice_fields(obj)
        for endpoint in obj.get("endpoints") or []:
            if not isinstance(endpoint, dict) or not _serving(endpoint):
                continue
            addresses = endpoint.get("addresses")
            ip = addresses[0] if isinstance(addresses, list) and addresses else None
            try:
                address = _address(str(ip), port)
            except ValueError:
                refused.append(f"slice {name}: an endpoint address that is not an IP: {ip!r}")
                continue
            target = endpoint.get("targetRef")
            pod = target.get("name") if isinstance(target, dict) else None
            suffix = pod if isinstance(pod, str) and pod else f"{ip}-{port}".replace(":", "-")
            try:
                backend = entry.backend(suffix, address, fields)
            except ValidationError as error:
                refused.append(f"slice {name}, {suffix}: {problems(error, BackendConfig)}")
                continue
            backends.setdefault(backend.id, backend)  # a pod in two slices while they move
    return sorted(backends.values(), key=lambda b: b.id), refused


def _metadata(obj: Mapping[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        raise KubeError("an object without metadata.name")
    return metadata["name"], str(metadata.get("resourceVersion", ""))


class EndpointSliceSource:
    def __init__(
        self,
        entry: DiscoveredEntry,
        config: EndpointSliceDiscovery,
        access: Callable[[], KubeAccess] | None = None,
    ) -> None:
        self._entry = entry
        self._config = config
        self._access = access or self._default_access
        self._client: KubeClient | None = None
        self._slices: dict[str, Mapping[str, Any]] = {}
        self._version = ""
        self._refused: frozenset[str] = frozenset()
        self._failing = False

    def _default_access(self) -> KubeAccess:
        if self._config.kubeconfig is not None:
            return from_kubeconfig(self._config.kubeconfig)
        return in_cluster()

    def _path(self, client: KubeClient) -> str:
        namespace = self._config.namespace or client.access.namespace
        return f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"

    def _selector(self) -> dict[str, str]:
        parts = [self._config.label_selector.strip()] if self._config.label_selector.strip() else []
        if self._config.service is not None:
            parts.append(f"{SERVICE_NAME_LABEL}={self._config.service}")
        return {"labelSelector": ",".join(parts)}

    @property
    def failing(self) -> bool:
        return self._failing

    async def first(self, publish: Publish) -> None:
        with contextlib.suppress(KubeError, ConfigError, aiohttp.ClientError, TimeoutError):
            await self._list(publish)

    async def run(self, publish: Publish) -> None:
        backoff = 0.0
        try:
            while True:
                try:
                    if not self._version:
                        await self._list(publish)
                    await self._watch(publish)
                    backoff = 0.0
                except ExpiredError:
                    log.info("EndpointSlice watch expired: listing again", entry=self._entry.id)
                    self._version = ""
                except (KubeError, ConfigError, aiohttp.ClientError, TimeoutError) as error:
                    self._failed(error)
                    self._version = ""
                    backoff = min(MAX_BACKOFF_S, max(0.5, backoff * 2))
                    await asyncio.sleep(backoff)
        finally:
            if self._client is not None:
                await self._client.close()

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            log.warning(
                "EndpointSlice discovery failed: backends kept as they were, trying again",
                entry=self._entry.id,
                error=str(error) or type(error).__name__,
            )
        self._failing = True

    def _connect(self) -> KubeClient:
        if self._client is None:
            self._client = KubeClient(self._access())
        return self._client

    async def _list(self, publish: Publish) -> None:
        client = self._connect()
        try:
            listing = await client.list(self._path(client), self._selector())
        except KubeError as error:
            self._failed(error)
            raise
        items = [i for i in listing.get("items", []) if isinstance(i, dict)]
        self._slices = {_metadata(item)[0]: item for item in items}
        metadata = listing.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(version, str) or not version:
            raise KubeError("a list without metadata.resourceVersion")
        self._version = version
        if self._failing:
            log.info("EndpointSlice discovery answers again", entry=self._entry.id)
        self._failing = False
        await self._publish(publish)

    async def _watch(self, publish: Publish) -> None:
        client = self._connect()
        params = {
            **self._selector(),
            "resourceVersion": self._version,
            "allowWatchBookmarks": "true",
        }
        events = client.watch(self._path(client), params, self._config.watch_timeout_s)
        async for kind, obj in events:
            name, version = _metadata(obj)
            if kind in ("ADDED", "MODIFIED"):
                self._slices[name] = obj
            elif kind == "DELETED":
                self._slices.pop(name, None)
            elif kind != "BOOKMARK":
                continue
            if version:
                self._version = version
            if kind != "BOOKMARK":
                await self._publish(publish)

    async def _publish(self, publish: Publish) -> None:
        backends, refused = endpoint_backends(self._entry, self._config, self._slices.values())
        if refused and frozenset(refused) != self._refused:
            log.warning("discovered endpoints refused", entry=self._entry.id, problems=refused)
        self._refused = frozenset(refused)
        await publish(backends)
