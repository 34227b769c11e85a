from __future__ import annotations

from pathlib import Path

import pytest

from backends import registry
from backends.base import Role
from router.errors import ConfigError
from router.settings import Settings, default_pool_path, load_pool


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
        ("backends: []", "backends: Tuple should have at least 1 item"),
        ("- just a list", "expected a mapping"),
        ("backends: [{id: a, address: 'h:1', role: prefill}]", "backends.0.model: Field required"),
        (
            "backends: [{id: a, address: 'nope', role: decode, model: m}]",
            "address must be host:port",
        ),
        (
            "backends: [{id: a, address: 'h:1', role: chef, model: m}]",
            "backends.0.role",
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
