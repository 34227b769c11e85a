"""What both ends of hetero.device.v1 share: the service's names and its message forms."""

from __future__ import annotations

from backends._gen.hetero.device.v1 import device_pb2
from backends.base import KVLayout, SamplingParams

SERVICE: str = device_pb2.DESCRIPTOR.services_by_name["Device"].full_name
# PushKV's metadata: the KV's handle on the device that made it, encoded.
PUSH_HANDLE_KEY = "x-kv-handle-bin"
# KV moves in pieces of this size: FetchKV/PushKV chunks and data plane segments.
KV_CHUNK_BYTES = 1 << 20
# KV chunks of 1 MiB plus protobuf framing must fit a message.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def layout_to_proto(layout: KVLayout) -> device_pb2.KVLayout:
    return device_pb2.KVLayout(
        layers=layout.layers,
        kv_heads=layout.kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        block_size=layout.block_size,
        tensor_parallel=layout.tensor_parallel,
    )


def layout_from_proto(message: device_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        layers=message.layers,
        kv_heads=message.kv_heads,
        head_dim=message.head_dim,
        dtype=message.dtype,
        block_size=message.block_size,
        tensor_parallel=message.tensor_parallel,
    )


def sampling_to_proto(sampling: SamplingParams) -> device_pb2.Sampling:
    return device_pb2.Sampling(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=sampling.stop,
    )


def sampling_from_proto(message: device_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        seed=message.seed,
        stop=tuple(message.stop),
    )
