from __future__ import annotations

import re
from pathlib import Path

import pytest

from backends import registry
from backends.base import Role
from router.errors import ConfigError
from router.settings import Settings, default_pool_path, is_loopback, load_pool, settings_from
from tests.pki import TestCA


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETERO_ROUTER_GRPC_ADDRESS", "0.0.0.0:6000")
    monkeypatch.setenv("HETERO_ROUTER_SPLIT_MIN_PROMPT_TOKENS", "99")
    settings = Settings()
    assert settings.grpc_address == "0.0.0.0:6000"
    assert settings.split_min_prompt_tokens == 99
    assert settings.http_address == "127.0.0.1:8080"


def test_inconsistent_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="default_max_tokens must not exceed"):
        Settings(default_max_tokens=10, max_tokens_limit=5)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("[::1]:8080", True),
        ("localhost:8080", True),
        ("LOCALHOST:8080", True),
        ("unix:/run/router.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":8080", False),  # no host: every interface
        ("10.0.0.7:8080", False),
        ("router.example.com:443", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_the_defaults_listen_on_loopback_only() -> None:
    settings = Settings()
    assert settings.exposed_doors() == []
    settings.check_exposure()


def test_a_door_beyond_loopback_needs_a_token_file_or_mtls_or_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(http_address="0.0.0.0:8080").check_exposure()
    message = str(raised.value)
    assert message.startswith("http_address 0.0.0.0:8080 listens beyond loopback")
    assert "auth_token_file" in message
    assert "HETERO_ROUTER_INSECURE=true" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^grpc_address"):
        Settings(grpc_address="[::]:50051", http_address="[::]:8080").check_exposure()
    Settings(http_address="0.0.0.0:8080", insecure=True).check_exposure()
    Settings(http_address="0.0.0.0:8080", auth_token_file=tmp_path / "t").check_exposure()
    cert, key, ca = tmp_path / "c", tmp_path / "k", tmp_path / "ca"
    mtls = Settings(
        http_address="0.0.0.0:8080", tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca
    )
    mtls.check_exposure()
    # TLS alone authenticates the server, not the clients: not enough.
    with pytest.raises(ConfigError):
        Settings(http_address="0.0.0.0:8080", tls_cert_file=cert, tls_key_file=key).check_exposure()


def test_security_settings_that_need_another_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_client_ca_file needs tls_cert_file"):
        Settings(tls_client_ca_file=tmp_path / "ca")
    with pytest.raises(ValueError, match="auth_reflection and auth_metrics need auth_token_file"):
        Settings(auth_metrics=True)


def test_the_client_burst_is_one_second_of_the_rate_unless_set() -> None:
    assert Settings(max_requests_per_s_per_client=2.5).client_burst() == 3
    assert Settings(max_requests_per_s_per_client=0.1).client_burst() == 1
    assert Settings(max_requests_per_s_per_client=5, client_request_burst=20).client_burst() == 20


def test_the_packaged_default_pool_is_two_h100_and_two_groq() -> None:
    pool = load_pool(None)
    assert default_pool_path().exists()
    roles = [(b.profile, b.role) for b in pool.backends]
    assert roles.count(("h100", Role.PREFILL)) == 2
    assert roles.count(("groq-lpu", Role.DECODE)) == 2
    assert pool.resolved_default_model == "llama-3.1-8b"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("backends: []", "backends: expected at least 1 item"),
        ("- just a list", "expected a mapping"),
        (
            "backends: [{id: a, address: 'h:1', role: prefill}]",
            "backends[0]: missing field 'model'",
        ),
        (
            "backends: [{id: a, address: 'nope', role: decode, model: m}]",
            "address must be host:port",
        ),
        (
            "backends: [{id: a, address: 'h:1', role: chef, model: m}]",
            "backends[0].role: expected 'prefill', 'decode' or 'both', got 'chef'",
        ),
        (
            "backends: [{id: a, address: 'h:1', role: decode, model: m},"
            " {id: a, address: 'h:2', role: decode, model: m}]",
            "repeated: a",
        ),
        (
            "default_model: x\nbackends: [{id: a, address: 'h:1', role: decode, model: m}]",
            "default_model 'x' is served by no backend",
        ),
        ("backends: [{id: a, address: 'h:1', role: decode, model: m, colour: red}]", "colour"),
        ("backends: [", "not valid YAML"),
    ],
)
def test_bad_pool_files_name_the_problem(tmp_path: Path, text: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_pool(path)
    assert reason in str(raised.value)
    assert str(path) in str(raised.value)


def test_missing_pool_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read pool file"):
        load_pool(tmp_path / "absent.yaml")


def test_the_example_pool_files_are_valid_and_use_known_adapters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "example-key")
    examples = sorted(Path(__file__).resolve().parents[2].glob("deploy/examples/*/pool.yaml"))
    assert examples, "deploy/examples has no pool file"
    for path in examples:
        pool = load_pool(path)
        for backend in pool.backends:
            assert backend.kind in registry.known_kinds(), f"{path}: {backend.kind}"
            registry.create(backend.kind, backend.id, backend.address, backend.options)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1:99999", "the port after the last ':' must be 0..65535"),
        ("127.0.0.1", "the port after the last ':' must be 0..65535"),
        ("localhost:", "the port after the last ':' must be 0..65535"),
        ("localhost:+80", "the port after the last ':' must be 0..65535"),
        (":50051", "no host before the ':'"),
        ("::1:50051", "an IPv6 host goes in brackets, as in [::1]:50051"),
        ("[::1:50051", "not an IPv6 address in the brackets"),
        ("[nope]:50051", "not an IPv6 address in the brackets"),
        ("local host:50051", "not a host name or IPv4 address"),
    ],
)
@pytest.mark.parametrize("field", ["grpc_address", "http_address"])
def test_bad_listen_addresses_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, field: str, address: str, reason: str
) -> None:
    monkeypatch.setenv(f"HETERO_ROUTER_{field.upper()}", address)
    with pytest.raises(ConfigError) as raised:
        settings_from({})
    assert str(raised.value) == (
        f"settings: HETERO_ROUTER_{field.upper()}: address must be host:port ({reason}), "
        f"got {address!r}"
    )


@pytest.mark.parametrize("address", ["127.0.0.1:0", "0.0.0.0:65535", "[::1]:50051", "[::]:8080"])
def test_good_listen_addresses_are_kept(address: str) -> None:
    assert settings_from({"grpc_address": address}).grpc_address == address


def test_a_flag_is_named_as_the_flag_and_the_environment_as_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HETERO_ROUTER_HTTP_ADDRESS", "127.0.0.1:99999")
    monkeypatch.setenv("HETERO_ROUTER_LOG_LEVEL", "verbose")
    with pytest.raises(ConfigError) as raised:
        settings_from({"http_address": "h:70000"}, {"http_address": "--http-address"})
    assert str(raised.value) == (
        "settings: --http-address: address must be host:port (the port after the last ':' "
        "must be 0..65535), got 'h:70000'; HETERO_ROUTER_LOG_LEVEL: expected 'debug', 'info', "
        "'warning' or 'error', got 'verbose'"
    )


@pytest.mark.parametrize("value", ["1e999", "inf", "-inf", "nan", "NaN"])
@pytest.mark.parametrize(
    "variable",
    ["HEALTH_TIMEOUT_S", "BYTES_PER_TOKEN", "STALL_STEP_MULTIPLE", "RETRY_BUDGET_PERCENT"],
)
def test_non_finite_floats_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(f"HETERO_ROUTER_{variable}", value)
    with pytest.raises(ConfigError, match=f"^settings: HETERO_ROUTER_{variable}: ") as raised:
        settings_from({})
    assert "finite" in str(raised.value) or "must be" in str(raised.value)


def test_every_float_setting_refuses_infinity() -> None:
    floats = [name for name, field in Settings.model_fields.items() if field.annotation is float]
    assert len(floats) > 15
    for name in floats:
        with pytest.raises(ConfigError, match=f"HETERO_ROUTER_{name.upper()}: "):
            settings_from({name: float("inf")})


def test_durations_are_at_most_a_day() -> None:
    durations = [name for name in Settings.model_fields if name.endswith("_s")]
    assert "health_timeout_s" in durations
    for name in durations:
        assert settings_from({name: 86_400}).model_dump()[name] == 86_400
        with pytest.raises(ConfigError, match=f"HETERO_ROUTER_{name.upper()}: must be <= 86400"):
            settings_from({name: 86_401})


def test_an_environment_problem_is_one_line_without_pydantic_links(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HETERO_ROUTER_MAX_IN_FLIGHT", "lots")
    monkeypatch.setenv("HETERO_ROUTER_MIGRATION", "maybe")
    with pytest.raises(ConfigError) as raised:
        settings_from({})
    message = str(raised.value)
    assert message == (
        "settings: HETERO_ROUTER_MIGRATION: expected true or false, got 'maybe'; "
        "HETERO_ROUTER_MAX_IN_FLIGHT: expected a whole number, got 'lots'"
    )


def test_a_pool_backend_problem_is_one_line_without_follow_on_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backends:\n"
        "  - {id: a, address: 'h:1', role: decode, model: m}\n"
        "  - {id: b, address: 'h:2', role: decode, model: m}\n"
        "  - {id: c, address: x, role: decode, model: m, time_scale: .inf}\n",
    )
    with pytest.raises(ConfigError) as raised:
        load_pool(path)
    assert str(raised.value) == (
        f"{path}: backends[2].address: address must be host:port (the port after the last ':' "
        "must be 0..65535), got 'x'; backends[2].time_scale: expected a finite number, got inf"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "the file is empty"),
        ("[" * 2000 + "]" * 2000, "is nested too deeply"),
        ("backends: [{id: a, address: 'h:1', role: decode, model: m, time_scale: -1}]",
         "backends[0].time_scale: must be >= 0"),
        ("backends: [{id: a, address: 'h:1', role: decode, model: m, time_scale: 5000}]",
         "backends[0].time_scale: must be <= 1000"),
    ],
)  # fmt: skip
def test_more_bad_pool_files_name_the_problem(tmp_path: Path, text: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(reason)):
        load_pool(path)


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        (b"not pem", None, None, "TLS_CERT_FILE {cert} is not a PEM file with a certificate"),
        (None, b"garbage", None, "TLS_KEY_FILE {key} is not a PEM file with a private key"),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            None,
            None,
            "TLS_CERT_FILE {cert} holds no valid certificate",
        ),
        (
            None,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            None,
            "TLS_KEY_FILE {key} is not a valid private key of the certificate in {cert}",
        ),
        (None, None, b"\x00\xff", "TLS_CLIENT_CA_FILE {ca} is not a PEM file with a certificate"),
        (
            None,
            None,
            b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
            "TLS_CLIENT_CA_FILE {ca} holds no valid certificate",
        ),
    ],
)
def test_garbage_pem_files_are_named(
    tmp_path: Path, cert: bytes | None, key: bytes | None, ca: bytes | None, message: str
) -> None:
    authority = TestCA(tmp_path)
    server = authority.issue("server")
    cert_path, key_path, ca_path = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert_path.write_bytes(server.cert_file.read_bytes() if cert is None else cert)
    key_path.write_bytes(server.key_file.read_bytes() if key is None else key)
    ca_path.write_bytes(authority.cert_file.read_bytes() if ca is None else ca)
    settings = Settings(tls_cert_file=cert_path, tls_key_file=key_path, tls_client_ca_file=ca_path)
    with pytest.raises(ConfigError) as raised:
        settings.tls_files()
    expected = message.format(cert=cert_path, key=key_path, ca=ca_path)
    assert str(raised.value).startswith(f"HETERO_ROUTER_{expected}")


def test_a_good_pem_pair_and_client_ca_are_served(tmp_path: Path) -> None:
    authority = TestCA(tmp_path)
    server = authority.issue("server")
    settings = Settings(
        tls_cert_file=server.cert_file,
        tls_key_file=server.key_file,
        tls_client_ca_file=authority.cert_file,
    )
    files = settings.tls_files()
    assert files is not None
    assert files.paths == (server.cert_file, server.key_file, authority.cert_file)
