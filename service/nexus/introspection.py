"""What a generic client asks a server about itself: health and reflection.

grpcio-health-checking's asyncio servicer lacks ``Health/List`` (its stub
raises NotImplementedError), so ``HealthServicer`` adds it. grpcio-reflection
serves only ``grpc.reflection.v1alpha``, while current grpcurl and buf curl ask
``grpc.reflection.v1`` first; v1's messages are v1alpha's, field for field,
under another package, so the same servicer answers both, and v1's descriptor
is derived from v1alpha's so that v1 itself can be described. The google.rpc
error detail messages (Status, BadRequest, ...) are in the descriptor pool, so
reflection resolves them and a generic client can decode
``grpc-status-details-bin``.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  (imported: in the pool for reflection)
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

REFLECTION_V1_PACKAGE = "grpc.reflection.v1"
REFLECTION_V1_SERVICE = f"{REFLECTION_V1_PACKAGE}.ServerReflection"


class HealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer with List."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every registered service's status: a snapshot, as health.proto specifies."""
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in list(self._server_status.items())
            }
        )


def _add_reflection_v1_descriptor() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default pool: v1alpha's
    file with its package (and the type names that carry it) renamed."""
    pool = descriptor_pool.Default()
    name = reflection_pb2.DESCRIPTOR.name.replace("v1alpha", "v1")
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old_prefix, new_prefix = f".{file.package}.", f".{REFLECTION_V1_PACKAGE}."
    file.name, file.package = name, REFLECTION_V1_PACKAGE
    file.ClearField("options")
    for message in file.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = message_field.type_name.replace(old_prefix, new_prefix)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old_prefix, new_prefix)
            method.output_type = method.output_type.replace(old_prefix, new_prefix)
    pool.AddSerializedFile(file.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection v1 and v1alpha for these services (and themselves)."""
    _add_reflection_v1_descriptor()
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler})
            for service in (reflection.SERVICE_NAME, REFLECTION_V1_SERVICE)
        )
    )
