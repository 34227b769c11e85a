"""Token frames: encoded ``hetero.router.v1.GenerateResponse`` messages, handled as bytes."""

from __future__ import annotations

from collections.abc import Sequence

from backends._gen.hetero.router.v1 import router_pb2


def coalesce(frames: Sequence[bytes]) -> bytes:
    """One frame carrying the tokens and text of several, in order.

    Used only when frames queue up because the client reads slower than the
    device writes: one message instead of many saves more than the parse costs.
    Concatenated protobuf messages would merge repeated fields but keep only the
    last ``text``, so the frames are decoded and joined.
    """
    if len(frames) == 1:
        return frames[0]
    merged = router_pb2.GenerateResponse()
    texts = []
    for frame in frames:
        part = router_pb2.GenerateResponse.FromString(frame)
        texts.append(part.text)
        part.text = ""
        merged.MergeFrom(part)
    merged.text = "".join(texts)
    return merged.SerializeToString()
