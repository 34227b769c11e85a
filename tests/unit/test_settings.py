from __future__ import annotations

from pathlib import Path

import pytest

from backends import registry
from backends.base import Role
from router.errors import ConfigError
from router.settings import Settings, default_pool_path, is_loopback, load_pool


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
