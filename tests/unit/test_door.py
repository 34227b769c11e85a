"""Who a request's client is, as the per-client cap counts it."""

from __future__ import annotations

import hmac

import pytest

from router.api.door import BearerTokens, grpc_peer_client, http_peer_client, token_client


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        ("ipv4:10.0.0.7:53211", "peer:10.0.0.7"),  # its connections count together
        ("ipv6:[::1]:50051", "peer:[::1]"),
        ("unix:/run/router.sock", "peer:/run/router.sock"),
        ("", "peer:unknown"),
    ],
)
def test_a_grpc_peer_is_its_address_without_the_port(peer: str, client: str) -> None:
    assert grpc_peer_client(peer) == client


def test_an_http_peer_is_its_address() -> None:
    assert http_peer_client("10.0.0.7") == "peer:10.0.0.7"
    assert http_peer_client(None) == "peer:unknown"


def test_a_token_is_kept_only_as_a_hash() -> None:
    client = token_client("Bearer s3cret")
    assert client.startswith("token:")
    assert "s3cret" not in client
    assert client == token_client("Bearer s3cret")
    assert client != token_client("Bearer other")
    # However the header spells the scheme, one token is one client for its caps.
    assert client == token_client("bearer  s3cret ")


@pytest.mark.parametrize(
    ("values", "allowed"),
    [
        (["Bearer alpha"], True),
        (["Bearer beta"], True),
        (["bearer alpha"], True),  # the scheme is case-insensitive
        (["Bearer gamma"], False),
        (["Basic alpha"], False),
        (["alpha"], False),
        (["Bearer "], False),
        ([], False),
        (["Bearer alpha", "Bearer alpha"], False),  # several: refused, whichever they are
        (["Bearer gamma", "Bearer alpha"], False),  # not "the last one wins"
        (["Bearer \udcff"], False),  # undecodable bytes as aiohttp hands them over
    ],
)
def test_exactly_one_accepted_bearer_token_is_allowed(values: list[str], allowed: bool) -> None:
    assert BearerTokens(["alpha", "beta"]).allows(values) is allowed


def test_every_configured_token_is_compared_whichever_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[bytes] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return compare(a, b)

    tokens = BearerTokens(["alpha", "beta", "gamma"])
    monkeypatch.setattr("router.api.door.hmac.compare_digest", counting)
    for value in ("Bearer alpha", "Bearer gamma", "Bearer nope"):
        compared.clear()
        tokens.allows([value])
        assert len(set(compared)) == 3  # no early exit on the first match
        assert {len(digest) for digest in compared} == {32}  # lengths do not show either
    assert not BearerTokens([])
