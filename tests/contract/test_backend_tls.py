"""TLS from the router to HTTP engines: the ``tls`` option of vLLM, SGLang and OpenAI backends.

The engine is a fake served over HTTPS that requires a client certificate from a
throwaway CA; the adapters read the pool file's option as the router does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Backend, GenerationRequest, Role, SamplingParams
from backends.openai import OpenAIBackend
from backends.sglang import SglangBackend
from backends.vllm import VllmBackend
from bench.fake_vllm import FakeVllm
from router.errors import ConfigError
from router.metrics import RouterMetrics
from router.pool.registry import Pool
from router.settings import BackendConfig, PoolConfig
from tests.contract.fake_openai import MODEL, FakeOpenAI
from tests.pki import Issued, TestCA

SERVED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    other_ca: TestCA  # signed nothing the engine shows
    engine: Issued
    router: Issued
    directory: Path

    def tls(self, *, ca: TestCA | None = None, client: bool = True) -> dict[str, str]:
        option = {"ca_file": str((ca or self.ca).cert_file)}
        if client:
            option |= {
                "cert_file": str(self.router.cert_file),
                "key_file": str(self.router.key_file),
            }
        return option


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = TestCA(tmp_path)
    return Pki(
        ca,
        TestCA(tmp_path, "other-ca"),
        ca.issue("engine"),
        ca.issue("router", client=True),
        tmp_path,
    )


@pytest.fixture
async def engine(pki: Pki) -> AsyncIterator[FakeVllm]:
    fake = FakeVllm(ssl_context=pki.ca.server_context(pki.engine, require_client_cert=True))
    await fake.start()
    yield fake
    await fake.stop()


# (address, tls option) -> an adapter whose health check reaches the fake engine
Adapter = Callable[[str, Any], Backend]
ADAPTERS: dict[str, Adapter] = {
    "vllm": lambda address, tls: VllmBackend("e0", address, {"model": SERVED_MODEL, "tls": tls}),
    "sglang": lambda address, tls: SglangBackend("e0", address, {"tls": tls}),
    "openai": lambda address, tls: OpenAIBackend("e0", address, {"tls": tls}),  # GET /v1/models
}


async def _health(adapter: Backend) -> tuple[bool, str]:
    await adapter.start()
    try:
        status = await adapter.check_health(5.0)
    finally:
        await adapter.close()
    return status.serving, status.detail


@pytest.mark.parametrize("make", ADAPTERS.values(), ids=ADAPTERS.keys())
async def test_the_right_ca_and_client_certificate_reach_the_engine(
    pki: Pki, engine: FakeVllm, make: Adapter
) -> None:
    assert await _health(make(engine.address, pki.tls())) == (True, "")


@pytest.mark.parametrize("make", ADAPTERS.values(), ids=ADAPTERS.keys())
async def test_without_the_client_certificate_the_engine_is_out_of_service_and_says_why(
    pki: Pki, engine: FakeVllm, make: Adapter
) -> None:
    serving, detail = await _health(make(engine.address, pki.tls(client=False)))
    assert not serving
    assert "tls.cert_file and tls.key_file" in detail


@pytest.mark.parametrize("make", ADAPTERS.values(), ids=ADAPTERS.keys())
async def test_an_engine_the_ca_did_not_sign_is_refused(
    pki: Pki, engine: FakeVllm, make: Adapter
) -> None:
    serving, detail = await _health(make(engine.address, pki.tls(ca=pki.other_ca)))
    assert not serving
    assert "certificate did not verify (tls.ca_file)" in detail


@pytest.mark.parametrize("tls", [None, True], ids=["plain-http", "system-cas"])
async def test_plain_http_or_the_systems_cas_do_not_reach_it(
    engine: FakeVllm, tls: bool | None
) -> None:
    serving, _ = await _health(VllmBackend("e0", engine.address, {"tls": tls}))
    assert not serving


async def test_a_vllm_stream_flows_over_mutual_tls(pki: Pki, engine: FakeVllm) -> None:
    adapter = VllmBackend("e0", engine.address, {"model": SERVED_MODEL, "tls": pki.tls()})
    await adapter.start()
    try:
        sampling = SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, seed=1)
        request = GenerationRequest("r1", "llama-3.1-8b", "Hello", sampling, 2)
        frames = [
            router_pb2.GenerateResponse.FromString(f) async for f in adapter.generate(request, 5)
        ]
    finally:
        await adapter.close()
    assert "".join(frame.text for frame in frames) == "Hello, world!"
    assert frames[-1].finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED


async def test_an_openai_key_travels_over_mutual_tls(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = FakeOpenAI(
        api_key="sk-test", ssl_context=pki.ca.server_context(pki.engine, require_client_cert=True)
    )
    await provider.start()
    monkeypatch.setenv("HETERO_ROUTER_TEST_TLS_KEY", "sk-test")
    options = {"model": MODEL, "api_key_env": "HETERO_ROUTER_TEST_TLS_KEY", "tls": pki.tls()}
    try:
        assert await _health(OpenAIBackend("e0", provider.address, options)) == (True, "")
        assert provider.base_url.startswith("https://")
    finally:
        await provider.stop()


def _pool(kind: str, options: dict[str, Any]) -> Pool:
    backend = BackendConfig(
        id="engine-7", kind=kind, address="127.0.0.1:1", role=Role.BOTH, model="m", options=options
    )
    return Pool(PoolConfig(backends=(backend,)), RouterMetrics(CollectorRegistry()))


def _write(pki: Pki, name: str, content: bytes) -> str:
    path = pki.directory / name
    path.write_bytes(content)
    return str(path)


FAKE_CERT = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


def _bad_option(case: str, pki: Pki) -> tuple[Any, str]:
    """A broken ``tls`` option and the start of what the router says of it."""
    cert, key = str(pki.router.cert_file), str(pki.router.key_file)
    directory = pki.directory
    cases: dict[str, tuple[Any, str]] = {
        "missing-ca": (
            {"ca_file": f"{directory}/nope.pem"},
            f"tls.ca_file {directory}/nope.pem: No such file",
        ),
        "garbage-ca": (
            {"ca_file": _write(pki, "ca.txt", b"not a pem")},
            f"tls.ca_file {directory}/ca.txt: not a PEM certificate bundle",
        ),
        "binary-ca": (
            {"ca_file": _write(pki, "ca.bin", b"\xbc\xff\x00")},
            f"tls.ca_file {directory}/ca.bin: not a PEM",
        ),
        "missing-key": (
            {"cert_file": cert, "key_file": f"{directory}/absent-key.pem"},
            f"tls.key_file {directory}/absent-key.pem: No such file",
        ),
        "garbage-cert": (
            {"cert_file": _write(pki, "c.pem", FAKE_CERT), "key_file": key},
            f"tls.cert_file {directory}/c.pem: not a PEM certificate",
        ),
        "garbage-key": (
            {"cert_file": cert, "key_file": _write(pki, "k.pem", b"junk")},
            f"tls.key_file {directory}/k.pem: not an unencrypted PEM private key",
        ),
        "key-of-another-cert": (
            {"cert_file": cert, "key_file": str(pki.engine.key_file)},
            f"tls.key_file {pki.engine.key_file}: not an unencrypted PEM private key of the",
        ),
        "cert-without-key": ({"cert_file": cert}, "tls.cert_file and tls.key_file go together"),
        "unknown-field": (
            {"ca": "x"},
            "unknown tls option(s) ca; known: ca_file, cert_file, key_file",
        ),
        "not-a-mapping": ("yes", "tls must be true or a mapping"),
        "not-a-path": ({"ca_file": 7}, "tls.ca_file must be a file path"),
    }
    return cases[case]


BAD_OPTIONS = (
    "missing-ca",
    "garbage-ca",
    "binary-ca",
    "missing-key",
    "garbage-cert",
    "garbage-key",
    "key-of-another-cert",
    "cert-without-key",
    "unknown-field",
    "not-a-mapping",
    "not-a-path",
)


@pytest.mark.parametrize("kind", ["vllm", "sglang", "openai"])
@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_tls_options_stop_the_router_at_start_in_one_line(
    pki: Pki, kind: str, case: str
) -> None:
    option, expected = _bad_option(case, pki)
    with pytest.raises(ConfigError) as raised:
        _pool(kind, {"tls": option})
    message = str(raised.value)
    assert message.startswith(f"backend engine-7: {expected}")
    assert "\n" not in message


def test_an_openai_base_url_that_is_not_https_contradicts_tls(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="tls is set but base_url http://h:1/v1 is not https"):
        _pool("openai", {"tls": pki.tls(), "base_url": "http://h:1/v1"})
