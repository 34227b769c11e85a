"""Hypothesis strategies for the gRPC door: well-formed GenerateRequests of any values
a client can set, and bytes near them (one byte of a serialized request changed)."""

from __future__ import annotations

from hypothesis import strategies as st

from backends._gen.hetero.router.v1 import router_pb2

UINT32 = st.integers(0, 2**32 - 1)


def generate_requests(models: list[str]) -> st.SearchStrategy[router_pb2.GenerateRequest]:
    """Any GenerateRequest, its model often one of ``models``; strings cross each limit."""
    return st.builds(
        router_pb2.GenerateRequest,
        request_id=st.text(max_size=140),
        model=st.sampled_from(["", *models]) | st.text(max_size=40),
        prompt=st.text(max_size=120),
        sampling=st.builds(
            router_pb2.SamplingParams,
            max_tokens=st.none() | UINT32,
            temperature=st.none() | st.floats(width=32),
            top_p=st.none() | st.floats(width=32),
            seed=st.none() | st.integers(0, 2**64 - 1),
            stop=st.lists(st.text(max_size=40) | st.just("s" * 257), max_size=10),
        ),
        disaggregation=st.integers(-(2**31), 2**31 - 1),
        slo=st.builds(router_pb2.Slo, ttft_ms=st.none() | UINT32, tpot_ms=st.none() | UINT32),
        priority=UINT32,
        slo_class=st.sampled_from(["", "default"]) | st.text(max_size=40),
    )


def _changed(data: bytes, where: int, byte: int) -> bytes:
    if not data:
        return bytes([byte])
    where %= len(data)
    return data[:where] + bytes([byte]) + data[where + 1 :]


def request_bytes(models: list[str]) -> st.SearchStrategy[bytes]:
    """Any bytes, or a serialized request with one byte changed."""
    serialized = generate_requests(models).map(lambda message: message.SerializeToString())
    return st.binary(max_size=120) | st.builds(
        _changed, serialized, st.integers(0), st.integers(0, 255)
    )
