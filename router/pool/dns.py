"""DNS discovery: the records of a name (a headless Service), re-resolved on an interval.

A and AAAA records give one backend per address, at the entry's ``port``; SRV
records give one per target and port (priority and weight are not used: every
target serves). A name that does not exist or holds no record of the type has no
backends (a headless Service with no ready pod): its backends drain. A lookup that
fails otherwise (a timeout, a server failure) changes nothing, and is logged once
per failing streak.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Sequence

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
from pydantic import ValidationError

from backends.config_files import problems
from router.logging import get_logger
from router.settings import BackendConfig, DiscoveredEntry, DnsDiscovery

log = get_logger(__name__)

Publish = Callable[[Sequence[BackendConfig]], Awaitable[None]]


def _resolver(config: DnsDiscovery) -> dns.asyncresolver.Resolver:
    if config.nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        host, _, port = config.nameserver.rpartition(":")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host.removeprefix("[").removesuffix("]")]
        resolver.port = int(port)
    resolver.lifetime = config.timeout_s
    return resolver


def _address(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a name (an SRV target)
    return f"{host}:{port}"


class DnsSource:
    def __init__(self, entry: DiscoveredEntry, config: DnsDiscovery) -> None:
        self._entry = entry
        self._config = config
        self._resolver = _resolver(config)
        self._failing = False
        self._refused: frozenset[str] = frozenset()

    @property
    def failing(self) -> bool:
        return self._failing

    async def first(self, publish: Publish) -> None:
        found = await self.resolve()
        if found is not None:
            await publish(found)

    async def run(self, publish: Publish) -> None:
        while True:
            await asyncio.sleep(self._config.interval_s)
            found = await self.resolve()
            if found is not None:
                await publish(found)

    async def resolve(self) -> list[BackendConfig] | None:
        """The backends the records name now; None when the lookup failed."""
        config = self._config
        try:
            # A relative name goes through the resolver's search list, as a pod's
            # own lookups do (vllm-decode -> vllm-decode.<namespace>.svc.cluster.local).
            answer = await self._resolver.resolve(config.name, config.record, search=True)
            records = (
                [(str(r.target).rstrip("."), r.port) for r in answer]
                if config.record == "SRV"
                else [(r.address, config.port or 0) for r in answer]
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            records = []
        except dns.exception.DNSException as error:
            if not self._failing:
                log.warning(
                    "DNS discovery failed: backends kept as they were",
                    entry=self._entry.id,
                    name=config.name,
                    record=config.record,
                    error=str(error) or type(error).__name__,
                )
            self._failing = True
            return None
        if self._failing:
            log.info("DNS discovery answers again", entry=self._entry.id, name=config.name)
        self._failing = False
        return self._backends(sorted(set(records)))

    def _backends(self, records: Sequence[tuple[str, int]]) -> list[BackendConfig]:
        backends: list[BackendConfig] = []
        refused: set[str] = set()
        for host, port in records:
            # A/AAAA: the address names it; SRV: the target's first label (a pod's
            # hostname under a headless Service) and the port.
            name = host.split(".")[0] if self._config.record == "SRV" else host.replace(":", "-")
            try:
                backends.append(self._entry.backend(f"{name}-{port}", _address(host, port), {}))
            except ValidationError as error:
                refused.add(f"{host}:{port}: {problems(error, BackendConfig)}")
        if refused and refused != self._refused:
            log.warning(
                "discovered endpoints refused", entry=self._entry.id, problems=sorted(refused)
            )
        self._refused = frozenset(refused)
        return backends
