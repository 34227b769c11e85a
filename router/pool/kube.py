"""A small client of the Kubernetes API: list and watch of one resource path.

Discovery needs two calls of one resource (``GET`` a list, ``GET ?watch=1`` a stream of
events), so this is an aiohttp client of those two rather than the official client:
aiohttp is already what the router serves HTTP with, nothing is added to the
image, and every field read from the API is checked here before it is used (an API
answer of the wrong shape is an error, never a crash).

Credentials: in a cluster, the pod's service account (its token re-read on every
request, as bound tokens rotate; the cluster's CA; KUBERNETES_SERVICE_HOST/PORT);
out of one, a kubeconfig file's current context (a token or token file, or a client
certificate; ``exec`` and auth-provider plugins are not supported).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from router.errors import ConfigError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A watch stream's read buffer; an event (one line) may be about twice as long. An
# EndpointSlice holds at most 1000 endpoints (100 by default): well within.
WATCH_BUFFER_BYTES = 2**20


class KubeError(Exception):
    """The API answered with an error, or with something that is not what was asked."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ExpiredError(KubeError):
    """410 Gone: the resourceVersion is too old to watch from; list again."""


@dataclass(frozen=True)
class KubeAccess:
    server: str  # https://host:port
    namespace: str  # the default namespace
    token: str | None = None
    token_file: Path | None = None
    ssl: ssl.SSLContext | bool = True  # False: plain HTTP (a local fake)

    def headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as error:
                raise KubeError(f"cannot read token {self.token_file}: {error.strerror}") from None
        return {"Authorization": f"Bearer {token}"} if token else {}


def in_cluster(root: Path = SERVICE_ACCOUNT, environ: Mapping[str, str] = os.environ) -> KubeAccess:
    """The pod's own access; ConfigError when not running in a pod."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError(
            "not in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT unset): "
            "give the entry a kubeconfig"
        )
    token = root / "token"
    if not token.is_file():
        raise ConfigError(f"no service account token at {token}")
    host = f"[{host}]" if ":" in host else host
    try:
        context = ssl.create_default_context(cafile=str(root / "ca.crt"))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"service account CA {root / 'ca.crt'}: {error}") from None
    namespace_file = root / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else "default"
    return KubeAccess(f"https://{host}:{port}", namespace, token_file=token, ssl=context)


def _named(items: Any, name: str, what: str) -> dict[str, Any]:
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(what)
            if isinstance(body, dict):
                return body
    raise ConfigError(f"no {what} named {name!r}")


def from_kubeconfig(path: Path) -> KubeAccess:
    """The access of a kubeconfig file's current context; ConfigError naming the file
    and what it lacks."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"kubeconfig {path}: cannot be read: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"kubeconfig {path}: not a mapping")
    try:
        context = _named(raw.get("contexts"), str(raw.get("current-context", "")), "context")
        cluster = _named(raw.get("clusters"), str(context.get("cluster", "")), "cluster")
        user = _named(raw.get("users"), str(context.get("user", "")), "user")
        return _access(path, context, cluster, user)
    except ConfigError as error:
        raise ConfigError(f"kubeconfig {path}: {error}") from None
    except (OSError, ssl.SSLError, ValueError, KeyError) as error:  # a CA or key file
        raise ConfigError(f"kubeconfig {path}: {type(error).__name__}: {error}") from None


def _access(
    path: Path, context: dict[str, Any], cluster: dict[str, Any], user: dict[str, Any]
) -> KubeAccess:
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise ConfigError("the cluster has no https:// server")
    if "exec" in user or "auth-provider" in user:
        raise ConfigError("exec and auth-provider credentials are not supported")
    namespace = str(context.get("namespace") or "default")
    here = path.parent

    def file(value: object) -> str:
        return str(here / str(value))

    tls: ssl.SSLContext | bool = False
    if server.startswith("https://"):
        context_ = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify") is True:
            context_.check_hostname = False
            context_.verify_mode = ssl.CERT_NONE
        if "certificate-authority-data" in cluster:
            data = base64.b64decode(str(cluster["certificate-authority-data"]))
            context_.load_verify_locations(cadata=data.decode())
        elif "certificate-authority" in cluster:
            context_.load_verify_locations(cafile=file(cluster["certificate-authority"]))
        _client_certificate(context_, user, file)
        tls = context_
    token_file = Path(file(user["tokenFile"])) if "tokenFile" in user else None
    token = str(user["token"]) if "token" in user else None
    return KubeAccess(server.rstrip("/"), namespace, token, token_file, tls)


def _client_certificate(context: ssl.SSLContext, user: dict[str, Any], file: Any) -> None:
    if "client-certificate" in user and "client-key" in user:
        context.load_cert_chain(file(user["client-certificate"]), file(user["client-key"]))
        return
    if "client-certificate-data" in user and "client-key-data" in user:
        # ssl reads a certificate and key from files only: a private temporary one.
        with tempfile.TemporaryDirectory() as folder:
            pem = Path(folder) / "client.pem"
            pem.touch(mode=0o600)
            pem.write_bytes(
                base64.b64decode(str(user["client-certificate-data"]))
                + b"\n"
                + base64.b64decode(str(user["client-key-data"]))
            )
            context.load_cert_chain(str(pem))


class KubeClient:
    def __init__(self, access: KubeAccess, timeout_s: float = 10.0) -> None:
        self.access = access
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.access.ssl),
                timeout=aiohttp.ClientTimeout(connect=self._timeout_s, sock_read=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def list(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        """The list at ``path``; KubeError when the API refuses or answers no list."""
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        async with self._client().get(
            self.access.server + path, params=params, headers=self.access.headers(),
            timeout=timeout,
        ) as response:  # fmt: skip
            await _raise_for_status(response)
            body = await response.json(content_type=None)
        if not isinstance(body, dict) or not isinstance(body.get("items", []), list):
            raise KubeError(f"GET {path}: the answer is not a list")
        return body

    async def watch(
        self, path: str, params: Mapping[str, str], timeout_s: float
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) of each event until the server ends the watch; ExpiredError
        on 410 Gone (as a status or as an ERROR event)."""
        query = {**params, "watch": "1", "timeoutSeconds": str(int(timeout_s))}
        timeout = aiohttp.ClientTimeout(connect=self._timeout_s, sock_read=timeout_s + 30)
        async with self._client().get(
            self.access.server + path, params=query, headers=self.access.headers(),
            timeout=timeout, read_bufsize=WATCH_BUFFER_BYTES,
        ) as response:  # fmt: skip
            await _raise_for_status(response)
            while True:
                try:
                    line = await response.content.readline()
                except ValueError:  # aiohttp's "line too long"
                    raise KubeError(f"watch {path}: an event too long to read") from None
                if not line:
                    return
                if line.strip():
                    yield _event(line)


def _event(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        event = json.loads(line)
    except ValueError:
        raise KubeError("a watch event that is not JSON") from None
    if not isinstance(event, dict):
        raise KubeError("a watch event that is not an object")
    kind, body = event.get("type"), event.get("object")
    if not isinstance(kind, str) or not isinstance(body, dict):
        raise KubeError("a watch event without type and object")
    if kind == "ERROR":
        code = body.get("code")
        message = f"watch error {code}: {str(body.get('message', ''))[:200]}"
        raise ExpiredError(message, 410) if code == 410 else KubeError(message, int(code or 0))
    return kind, body


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 300:
        return
    text = (await response.text(errors="replace"))[:200]
    message = f"{response.method} {response.url.path}: HTTP {response.status}: {text}"
    if response.status == 410:
        raise ExpiredError(message, 410)
    raise KubeError(message, response.status)
