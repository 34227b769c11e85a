"""The SDK's retries, TLS and bearer tokens against a real router."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import os
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from multidict import CIMultiDict

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role
from router.cli import main
from router.client import GENERATE_METHOD, ROUTER_SERVICE, AsyncRouterClient, ChannelConfig
from router.daemon import Daemon
from router.errors import ConfigError
from router.settings import BackendConfig, PoolConfig, Settings
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import sample_total

Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def issue(
    directory: Path, name: str, issuer: Issuer | None = None, *, ca: bool = False
) -> tuple[Path, Path]:
    """A certificate for ``localhost`` and 127.0.0.1 (or a CA's, with ``ca``) and its key,
    as ``<name>.pem`` and ``<name>.key`` in ``directory``; signed by ``issuer``, or by
    itself without one."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} localhost")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.sign(key if issuer is None else issuer[1], hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def self_signed(directory: Path) -> tuple[Path, Path]:
    return issue(directory, "cert")


def load_issuer(cert: Path, key: Path) -> Issuer:
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(cert.read_bytes()), private


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
    return sample_total(
        cluster.daemon.registry,
        "hetero_router_requests_total",
        outcome="nohealthybackend",
        mode="none",
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
    with pytest.raises(ConfigError, match="is not a valid private key of the certificate"):
        Daemon(mismatched, pool)
    missing = Settings(tls_cert_file=tmp_path / "missing.pem", tls_key_file=key)
    with pytest.raises(
        ConfigError, match=r"cannot read HETERO_ROUTER_TLS_CERT_FILE .*missing\.pem"
    ):
        Daemon(missing, pool)


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA, a server certificate and a client certificate it signed."""

    directory: Path
    ca: Path
    issuer: Issuer
    server: tuple[Path, Path]
    client: tuple[Path, Path]

    def reissue_server(self) -> bytes:
        """Rewrites the server's files in place with a new certificate and key (their
        modification time moved on, as any rewrite moves it); the new certificate (DER)."""
        cert, key = issue(self.directory, "server", self.issuer)
        for path in (cert, key):
            later = path.stat().st_mtime_ns + 1_000_000_000
            os.utime(path, ns=(later, later))
        return der(cert)


def make_pki(directory: Path) -> Pki:
    ca, ca_key = issue(directory, "ca", ca=True)
    issuer = load_issuer(ca, ca_key)
    return Pki(
        directory,
        ca,
        issuer,
        issue(directory, "server", issuer),
        issue(directory, "client", issuer),
    )


def der(cert: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def client_context(pki: Pki, client: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(*client)
    return context


async def served_certificate(port: int, pki: Pki) -> bytes:
    """The certificate (DER) a new TLS connection to ``port`` is shown."""
    context = client_context(pki, pki.client)
    context.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    assert isinstance(certificate, bytes)
    return certificate


def mtls_channel(cluster: Cluster, pki: Pki, client: tuple[Path, Path] | None) -> ChannelConfig:
    return ChannelConfig(
        cluster.address,
        timeout_s=10,
        tls=True,
        root_certificates=pki.ca.read_bytes(),
        certificate_chain=None if client is None else client[0].read_bytes(),
        private_key=None if client is None else client[1].read_bytes(),
        max_attempts=1,
    )


async def mtls_cluster(pki: Pki) -> Cluster:
    cert, key = pki.server
    return await start_cluster(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki.ca)


async def test_the_generate_command_reaches_a_router_that_wants_mtls_and_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    cert, key = pki.server
    cluster = await start_cluster(
        tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki.ca, auth_token_file=tokens
    )
    client_cert, client_key = pki.client
    secure = ["--ca-file", str(pki.ca), "--cert-file", str(client_cert)]
    secure += ["--key-file", str(client_key), "--token-file", str(tokens)]
    command = [
        "generate",
        "hi",
        "--address",
        cluster.address,
        "--max-tokens",
        "3",
        "--timeout",
        "30",
    ]
    try:
        assert await asyncio.to_thread(main, [*command, *secure]) == 0
        assert "3 completion tokens" in capsys.readouterr().err
        # Without the token: refused by the router, not by the handshake.
        assert await asyncio.to_thread(main, [*command, *secure[:6]]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert await asyncio.to_thread(main, [*command, *secure[:4]]) == 2  # a cert needs its key
        assert "go together" in capsys.readouterr().err
    finally:
        await stop_cluster(cluster)


async def test_mtls_serves_only_clients_with_a_certificate_the_ca_signed(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    (tmp_path / "other").mkdir()
    stranger = issue(tmp_path / "other", "stranger")  # self-signed: not the CA's
    cluster = await mtls_cluster(pki)
    try:
        async with AsyncRouterClient(mtls_channel(cluster, pki, pki.client)) as client:
            responses = [r async for r in client.generate("mutual", max_tokens=4)]
        assert responses[-1].finish_reason != 0
        for refused in (None, stranger):
            async with AsyncRouterClient(mtls_channel(cluster, pki, refused)) as client:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await client.list_backends()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # no handshake

        url = f"https://127.0.0.1:{cluster.daemon.http_port}/v1/models"
        for refused in (None, stranger):
            connector = aiohttp.TCPConnector(ssl=client_context(pki, refused))
            async with aiohttp.ClientSession(connector=connector) as session:
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(url) as reply:
                        await reply.read()
        connector = aiohttp.TCPConnector(ssl=client_context(pki, pki.client))
        async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as reply:
            assert reply.status == 200
    finally:
        await stop_cluster(cluster)


async def test_rewritten_certificate_files_are_served_to_new_connections(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    first = der(pki.server[0])
    cluster = await mtls_cluster(pki)
    grpc_port, http_port = cluster.daemon.grpc_port, cluster.daemon.http_port
    try:
        assert await served_certificate(grpc_port, pki) == first
        assert await served_certificate(http_port, pki) == first
        second = pki.reissue_server()
        assert second != first
        # The gRPC door checks the files at each handshake.
        assert await served_certificate(grpc_port, pki) == second
        # The HTTP door at its reload check (on a timer: driven here).
        assert await served_certificate(http_port, pki) == first
        assert cluster.daemon.admin.reload_tls() is True
        assert cluster.daemon.admin.reload_tls() is False  # nothing changed since
        assert await served_certificate(http_port, pki) == second
        # A new connection through the SDK is served under the new certificate.
        async with AsyncRouterClient(mtls_channel(cluster, pki, pki.client)) as client:
            assert len((await client.list_backends()).backends) == 4

        # A pair that does not load (a key rewritten with garbage) is not taken up.
        pki.server[1].write_text("not a key\n")
        assert cluster.daemon.admin.reload_tls() is False
        assert await served_certificate(http_port, pki) == second
        assert await served_certificate(grpc_port, pki) == second
    finally:
        await stop_cluster(cluster)


def write_tokens(tmp_path: Path) -> Path:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha\nbeta\n")
    return tokens


async def test_several_authorization_entries_are_refused_on_both_doors(tmp_path: Path) -> None:
    cluster = await start_cluster(auth_token_file=write_tokens(tmp_path))
    try:
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            generate = channel.unary_stream(
                GENERATE_METHOD,
                request_serializer=router_pb2.GenerateRequest.SerializeToString,
                response_deserializer=router_pb2.GenerateResponse.FromString,
            )
            request = router_pb2.GenerateRequest(
                prompt="hi", sampling=router_pb2.SamplingParams(max_tokens=2)
            )
            for metadata in (
                (("authorization", "Bearer alpha"), ("authorization", "Bearer alpha")),
                (("authorization", "Bearer nope"), ("authorization", "Bearer alpha")),
                (("authorization", "Bearer alpha"), ("authorization", "Bearer nope")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in generate(request, metadata=metadata):
                        pass
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            served = [
                r async for r in generate(request, metadata=(("authorization", "bearer beta"),))
            ]
            assert served[-1].finish_reason != 0

        url = f"http://127.0.0.1:{cluster.daemon.http_port}/v1/models"
        async with aiohttp.ClientSession() as session:
            for values in (["Bearer alpha", "Bearer alpha"], ["Bearer nope", "Bearer alpha"]):
                headers = CIMultiDict(("Authorization", value) for value in values)
                async with session.get(url, headers=headers) as reply:
                    assert reply.status == 401
                    assert reply.headers["WWW-Authenticate"] == "Bearer"
                    assert (await reply.json())["error"]["type"] == "authentication_error"
            async with session.get(url, headers={"Authorization": "Bearer alpha"}) as reply:
                assert reply.status == 200
    finally:
        await stop_cluster(cluster)


async def reflected_services(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), metadata=metadata):
            return {service.name for service in reply.list_services_response.service}
    return set()


# grpc.aio puts INTERNAL ("Failed "execute_batch"") in place of the server's status when
# that status arrives while the client is still sending its request message (grpc/aio
# _call.py, _write: set_internal_error). Only a refused call can race so; one that lost
# that race is asked again, a bounded number of times.
CLIENT_SEND_RACE = "execute_batch"
REFUSAL_ATTEMPTS = 5


async def refused_reflection(
    address: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    """The status the server refuses a reflection call with."""
    for _ in range(REFUSAL_ATTEMPTS):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await reflected_services(address, metadata)
        error = raised.value
        lost_the_race = error.code() is grpc.StatusCode.INTERNAL and CLIENT_SEND_RACE in (
            error.debug_error_string() or ""
        )
        if not lost_the_race:
            return error.code()
    pytest.fail(f"every one of {REFUSAL_ATTEMPTS} reflection calls lost the client's send race")


async def grpc_health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return int(reply.status)


@pytest.mark.parametrize("guarded", [False, True])
async def test_reflection_and_metrics_need_the_token_only_when_told(
    tmp_path: Path, guarded: bool
) -> None:
    cluster = await start_cluster(
        auth_token_file=write_tokens(tmp_path), auth_reflection=guarded, auth_metrics=guarded
    )
    token = (("authorization", "Bearer alpha"),)
    url = f"http://127.0.0.1:{cluster.daemon.http_port}"
    try:
        assert ROUTER_SERVICE in await reflected_services(cluster.address, token)
        if guarded:
            assert await refused_reflection(cluster.address) == grpc.StatusCode.UNAUTHENTICATED
            wrong = (("authorization", "Bearer nope"),)
            assert (
                await refused_reflection(cluster.address, wrong) == grpc.StatusCode.UNAUTHENTICATED
            )
        else:
            assert ROUTER_SERVICE in await reflected_services(cluster.address)
        # Health and the probes are open whatever the settings.
        assert await grpc_health(cluster.address) == health_pb2.HealthCheckResponse.SERVING
        async with aiohttp.ClientSession() as session:
            for probe in ("/healthz", "/readyz"):
                async with session.get(url + probe) as reply:
                    assert reply.status == 200
            async with session.get(url + "/metrics") as reply:
                assert reply.status == (401 if guarded else 200)
            headers = {"Authorization": "Bearer beta"}
            async with session.get(url + "/metrics", headers=headers) as reply:
                assert reply.status == 200
                assert "hetero_router_requests_total" in await reply.text()
    finally:
        await stop_cluster(cluster)


async def test_a_client_over_its_request_rate_is_refused_with_a_retry_hint() -> None:
    # One request per 100 s, in bursts of one: the second is refused on either door.
    cluster = await start_cluster(max_requests_per_s_per_client=0.01)
    try:
        served = [r async for r in cluster.client.generate("first", max_tokens=2)]
        assert served[-1].finish_reason != 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in cluster.client.generate("second", max_tokens=2):
                pass
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_requests_per_s_per_client 0.01" in (raised.value.details() or "")
        trailing = dict(raised.value.trailing_metadata() or ())
        assert 99_000 <= int(trailing["retry-after-ms"]) <= 100_000  # when its token is back

        url = f"http://127.0.0.1:{cluster.daemon.http_port}/v1/completions"
        body = {"prompt": "third", "max_tokens": 2}
        async with (
            aiohttp.ClientSession() as session,  # the same client as the gRPC calls: 127.0.0.1
            session.post(url, json=body) as reply,
        ):
            assert reply.status == 429
            assert reply.headers["Retry-After"] == "100"
            assert (await reply.json())["error"]["type"] == "rate_limit_exceeded"
        shed = sample_total(
            cluster.daemon.registry, "hetero_router_shed_total", reason="client_rate"
        )
        assert shed == 2
    finally:
        await stop_cluster(cluster)


def test_a_door_beyond_loopback_without_authentication_is_refused_at_start(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("router.cli.configure", lambda *_: None)  # logging stays the tests'
    assert main(["serve", "--http-address", "0.0.0.0:8080"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("hetero-router: http_address 0.0.0.0:8080 listens beyond loopback")
    assert "--insecure" in lines[0]


async def test_insecure_serves_a_door_beyond_loopback_and_says_so() -> None:
    pool = PoolConfig(
        backends=(BackendConfig(id="a", address="127.0.0.1:1", role=Role.BOTH, model="m"),)
    )
    with pytest.raises(ConfigError, match=r"grpc_address 0\.0\.0\.0:0 listens beyond loopback"):
        Daemon(Settings(grpc_address="0.0.0.0:0"), pool)
    daemon = Daemon(Settings(grpc_address="0.0.0.0:0", insecure=True), pool)
    with structlog.testing.capture_logs() as logs:
        daemon._warn_if_open()  # what start logs once it listens
    (warning,) = [log for log in logs if log["log_level"] == "warning"]
    assert "no client authentication" in warning["event"]
    assert warning["doors"] == {"grpc_address": "0.0.0.0:0"}
