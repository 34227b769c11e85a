"""A real DNS server for discovery tests: dnsmasq (Debian's dnsmasq-base) on 127.0.0.1.

It answers from a hosts file the test writes (SIGHUP makes it read the file again)
and is authoritative for ``.test``, so a name with no record is NXDOMAIN, as CoreDNS
answers for a headless Service with no ready pod. Tests skip, saying why, where
dnsmasq is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver
import pytest

DNSMASQ = shutil.which("dnsmasq") or (
    "/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None
)


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq takes no port 0).

    UDP and TCP ports are handed out apart: the free UDP port may be a TCP port in use
    (a device's listener, say), so one taken on TCP is passed over.
    """
    for _attempt in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise OSError("no port free for both UDP and TCP on 127.0.0.1 after 50 tries")


@dataclass
class Dnsmasq:
    process: asyncio.subprocess.Process
    port: int
    hosts: Path

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_hosts(self, lines: Sequence[str]) -> None:
        """Replaces the A/AAAA records (``"127.0.0.2 decode.test"`` lines)."""
        self.hosts.write_text("".join(f"{line}\n" for line in lines))
        self.process.send_signal(signal.SIGHUP)

    async def addresses(self, name: str) -> list[str]:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], self.port, 1.0
        try:
            return sorted(r.address for r in await resolver.resolve(name, "A"))
        except dns.exception.DNSException:
            return []


@contextlib.asynccontextmanager
async def dnsmasq(
    folder: Path, hosts: Sequence[str], srv: Sequence[str] = ()
) -> AsyncIterator[Dnsmasq]:
    """dnsmasq serving ``hosts`` lines and ``srv`` records (``--srv-host`` values: fixed)."""
    if DNSMASQ is None:
        pytest.skip(
            "dnsmasq is not installed (apt-get install dnsmasq-base): DNS discovery untested"
        )
    hosts_file = folder / "hosts"
    hosts_file.write_text("".join(f"{line}\n" for line in hosts))
    for _attempt in range(3):  # the free port may be taken before dnsmasq binds it
        port = _free_port()
        process = await asyncio.create_subprocess_exec(
            DNSMASQ, "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1",
            "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts_file}",
            "--local=/test/", "--conf-file=/dev/null", "--pid-file=", "--log-facility=-",
            *(f"--srv-host={record}" for record in srv),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        server = Dnsmasq(process, port, hosts_file)
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while process.returncode is None and not await _answers(server):
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError("dnsmasq did not answer within 10 s")
                await asyncio.sleep(0.02)
            if process.returncode is None:
                break
        except BaseException:
            process.kill()
            await process.wait()
            raise
    else:
        stderr = await process.stderr.read() if process.stderr else b""
        raise RuntimeError(f"dnsmasq did not start: {stderr.decode(errors='replace')}")
    try:
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def _answers(server: Dnsmasq) -> bool:
    """Whether the server answers at all (NXDOMAIN is an answer)."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], server.port, 0.5
    try:
        await resolver.resolve("absent.test", "A")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return True
    except dns.exception.DNSException:
        return False
    return True
