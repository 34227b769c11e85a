"""Server reflection as grpc.reflection.v1 and as its older twin, v1alpha.

grpcio-reflection serves v1alpha only, which newer tools (grpcurl, Postman) try after
v1. The two are one protocol under two package names, every message and field alike,
so one servicer answers both: the v1 method reads and writes its messages with
v1alpha's classes, which make the same bytes. v1's descriptor, v1alpha's with the
package renamed, joins the descriptor pool, so that a client can describe it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2

V1ALPHA_SERVICE: str = v1alpha.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def serve(server: Any, service_names: Iterable[str]) -> None:
    """Adds reflection, both versions, to ``server`` (a grpc.aio server); it lists
    ``service_names`` and itself."""
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = v1alpha.aio.ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
            for name in (V1_SERVICE, V1ALPHA_SERVICE)
        )
    )


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return  # added before (another server in this process, or a newer grpcio-reflection)
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = f".{file.package}.", f".{V1_PACKAGE}."
    file.name, file.package = _V1_FILE, V1_PACKAGE
    file.options.Clear()  # language packages named after v1alpha
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # a message or enum field
                field.type_name = field.type_name.replace(old, new, 1)
    for service in file.service:
        for rpc in service.method:
            rpc.input_type = rpc.input_type.replace(old, new, 1)
            rpc.output_type = rpc.output_type.replace(old, new, 1)
    pool.AddSerializedFile(file.SerializeToString())
