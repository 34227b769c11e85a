"""An in-process fake of the Kubernetes API's EndpointSlice list and watch.

There is no API server on these machines: this fake (aiohttp on 127.0.0.1, port 0)
answers the two calls discovery makes, as the API server does: a list with its
``metadata.resourceVersion``, and ``?watch=1&resourceVersion=N`` streaming one JSON
event per line (ADDED, MODIFIED, DELETED, BOOKMARK), and an ERROR event with code 410
for a version older than the history it keeps (``compact``). It checks the bearer
token and applies equality label selectors.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

TOKEN = "fake-token"


@dataclass
class FakeKubeApi:
    namespace: str = "ns"
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = 100
    oldest: int = 100  # the oldest version a watch may start from
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    lists: int = 0
    watches: int = 0
    selectors: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _cuts: int = 0  # watches end when it moves
    _stopped: bool = False
    port: int = 0
    refusing: bool = False  # answer 503, as an API server that is not ready

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", self._get
        )
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started

    async def stop(self) -> None:
        self._stopped = True
        self._wake()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": self.namespace}}],
        }))  # fmt: skip
        return path

    # -- changes, as the EndpointSlice controller makes them -----------------------

    def put(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        kind = "MODIFIED" if name in self.slices else "ADDED"
        self._record(kind, obj)
        self.slices[name] = self.history[-1][2]

    def delete(self, name: str) -> None:
        self._record("DELETED", self.slices.pop(name))

    def cut_watches(self) -> None:
        """Ends every watch in progress (an API server restarting, a load balancer's idle
        timeout)."""
        self._cuts += 1
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def compact(self) -> None:
        """Forgets the history: a watch from any version seen so far gets 410 Gone."""
        self.oldest = self.version + 1
        self.history.clear()

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, kind, stored))
        self._wake()

    # -- the API ---------------------------------------------------------------------

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if self.refusing:
            return web.json_response({"kind": "Status", "code": 503}, status=503)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if request.match_info["namespace"] != self.namespace:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        selector = _selector(request.query.get("labelSelector", ""))
        self.selectors.append(request.query.get("labelSelector", ""))
        if request.query.get("watch") not in ("1", "true"):
            self.lists += 1
            items = [s for s in self.slices.values() if _matches(s, selector)]
            return web.json_response({
                "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.version)}, "items": items,
            })  # fmt: skip
        self.watches += 1
        return await self._watch(request, selector, int(request.query["resourceVersion"]))

    async def _watch(
        self, request: web.Request, selector: Mapping[str, str], since: int
    ) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        if since < self.oldest - 1:
            gone = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                    "message": f"too old resource version: {since} ({self.oldest})"}  # fmt: skip
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return response
        seen, cuts = since, self._cuts
        while True:
            changed = self._changed
            for version, kind, obj in list(self.history):
                if version > seen:
                    seen = version
                    if _matches(obj, selector):
                        event = {"type": kind, "object": obj}
                        await response.write(json.dumps(event).encode() + b"\n")
            if self._stopped or cuts != self._cuts or request.transport is None:
                return response
            await changed.wait()


def _selector(text: str) -> dict[str, str]:
    pairs = [part.split("=", 1) for part in text.split(",") if "=" in part]
    return {key.strip(): value.strip() for key, value in pairs}


def _matches(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels", {})
    return all(labels.get(key) == value for key, value in selector.items())


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    *,
    port: int,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    port_name: str = "grpc",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": service, **(labels or {})},
            "annotations": dict(annotations or {}),
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def pod_endpoint(
    pod: str, ip: str, *, ready: bool | None = True, terminating: bool = False
) -> dict[str, Any]:
    conditions: dict[str, Any] = {"serving": ready is not False, "terminating": terminating}
    if ready is not None:
        conditions["ready"] = ready
    return {
        "addresses": [ip],
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "ns"},
    }
