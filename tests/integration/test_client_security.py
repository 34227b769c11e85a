"""The SDK's retries, TLS and bearer tokens against a real router."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backends.base import Role
from router.client import AsyncRouterClient, ChannelConfig
from router.daemon import Daemon
from router.errors import ConfigError
from router.settings import BackendConfig, PoolConfig, Settings
from tests.conftest import Cluster, start_cluster, stop_cluster


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def attempts_without_decode(cluster: Cluster, client: AsyncRouterClient) -> float | None:
    """Stops every decode device, then makes one split call that must end UNAVAILABLE
    before any token; how many attempts of it reached the router."""
    for name in ("groq-0", "groq-1"):
        await cluster.devices[name].stop(grace_s=0)
    await cluster.daemon.health.check_all()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in client.generate("retry me", disaggregation="split"):
            pass
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    return cluster.daemon.registry.get_sample_value(
        "hetero_router_requests_total", {"outcome": "nohealthybackend", "mode": "none"}
    )


async def test_unavailable_before_the_first_token_is_retried(cluster: Cluster) -> None:
    # Scheduling fails before any token: UNAVAILABLE, which the client retries.
    async with AsyncRouterClient(ChannelConfig(cluster.address, max_attempts=3)) as client:
        assert await attempts_without_decode(cluster, client) == 3


async def test_a_client_with_retries_off_is_not_retried(cluster: Cluster) -> None:
    async with AsyncRouterClient(ChannelConfig(cluster.address, max_attempts=1)) as client:
        served = [m async for m in client.generate("once", max_tokens=3)]
        assert served[-1].finish_reason
        assert await attempts_without_decode(cluster, client) == 1


async def test_tls_and_bearer_tokens_guard_both_doors(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    cluster = await start_cluster(tls_cert_file=cert, tls_key_file=key, auth_token_file=tokens)
    try:
        secure = ChannelConfig(
            cluster.address, tls=True, root_certificates=cert.read_bytes(), bearer_token="s3cret"
        )
        async with AsyncRouterClient(secure) as client:
            responses = [r async for r in client.generate("secure", max_tokens=4)]
        assert responses[-1].finish_reason != 0

        wrong = ChannelConfig(
            cluster.address, tls=True, root_certificates=cert.read_bytes(), bearer_token="nope"
        )
        async with AsyncRouterClient(wrong) as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.list_backends()
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

        url = f"https://127.0.0.1:{cluster.daemon.http_port}"
        context = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            async with session.get(f"{url}/v1/models") as reply:
                assert reply.status == 401
                assert (await reply.json())["error"]["type"] == "authentication_error"
            headers = {"Authorization": "Bearer s3cret"}
            async with session.get(f"{url}/v1/models", headers=headers) as reply:
                assert reply.status == 200
            async with session.get(f"{url}/readyz") as reply:
                assert reply.status == 200  # probes need no token
    finally:
        await stop_cluster(cluster)


async def test_a_tls_pair_that_cannot_be_loaded_is_reported_before_anything_starts(
    tmp_path: Path,
) -> None:
    _, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    pool = PoolConfig(
        backends=(BackendConfig(id="a", address="127.0.0.1:1", role=Role.BOTH, model="m"),)
    )
    mismatched = Settings(tls_cert_file=other_cert, tls_key_file=key)
    with pytest.raises(ConfigError, match="cannot load TLS pair"):
        Daemon(mismatched, pool)
    missing = Settings(tls_cert_file=tmp_path / "missing.pem", tls_key_file=key)
    with pytest.raises(ConfigError, match="cannot read TLS file"):
        Daemon(missing, pool)
