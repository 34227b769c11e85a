"""Who a request's client is, as the per-client cap counts it."""

from __future__ import annotations

import pytest

from router.api.door import grpc_peer_client, http_peer_client, token_client


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
