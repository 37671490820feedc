"""What a generic client learns from the server itself: health (Check, List)
and reflection, both grpc.reflection.v1 (what current grpcurl and buf curl ask
first) and v1alpha, including the google.rpc messages a client needs to decode
rich errors (grpc-status-details-bin) without any compiled protos.

The reflection clients are real: grpcio-reflection's
ProtoReflectionDescriptorDatabase (speaking v1 through a channel interceptor
that renames its method) and the `buf curl` binary.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from nexus.server import CLUSTER_HEALTH, SERVICE_NAMES, NexusServer
from nexus.v1 import interaction_pb2 as pb

from support.rpc import SERVICE, Clients, rpc_error

V1ALPHA_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
REFLECTION_SERVICES = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
BAD_ENTRY_IDS = pb.GetEntriesRequest(entry_ids=["not-a-uuid"])
BUF = shutil.which("buf", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


class _ReflectionV1(grpc.StreamStreamClientInterceptor):
    """Sends grpcio-reflection's v1alpha client calls to the v1 service (same
    messages), and records which method each call really used."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        if details.method == V1ALPHA_METHOD:
            details = details._replace(method=V1_METHOD)  # grpc's call details are a namedtuple
        self.methods.append(details.method)
        return continuation(details, request_iterator)


def reflect(port: int, version: str, lookup: Any) -> Any:
    """Runs lookup(descriptor database, pool) with a reflection client of this
    version (blocking: call it in a thread)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        recorder = _ReflectionV1()
        channel = grpc.intercept_channel(plain, recorder) if version == "v1" else plain
        database = ProtoReflectionDescriptorDatabase(channel)
        result = lookup(database, descriptor_pool.DescriptorPool(database))
    if version == "v1":
        assert recorder.methods and set(recorder.methods) == {V1_METHOD}, recorder.methods
    return result


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_services_and_resolves_error_details(server: NexusServer, version: str) -> None:
    def lookup(database: ProtoReflectionDescriptorDatabase, pool: descriptor_pool.DescriptorPool) -> dict[str, Any]:
        return {
            "services": set(database.get_services()),
            "interaction": [m.name for m in pool.FindServiceByName("nexus.v1.InteractionService").methods],
            "reflection_v1_input": pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
            .methods_by_name["ServerReflectionInfo"]
            .input_type.full_name,
            "bad_request": [f.name for f in pool.FindMessageTypeByName("google.rpc.BadRequest").fields],
            "status": [f.name for f in pool.FindMessageTypeByName("google.rpc.Status").fields],
        }

    found = await asyncio.to_thread(reflect, server.port, version, lookup)
    assert found["services"] == {*SERVICE_NAMES, "grpc.health.v1.Health", *REFLECTION_SERVICES}
    assert {"GetEntries", "GetBranchTree", "ToggleResonance"} <= set(found["interaction"])
    assert found["reflection_v1_input"] == "grpc.reflection.v1.ServerReflectionRequest"
    assert found["bad_request"] == ["field_violations"]
    assert found["status"] == ["code", "message", "details"]


async def test_a_client_with_only_reflection_decodes_a_rich_error(server: NexusServer, clients: Clients) -> None:
    error = await rpc_error(clients.interactions.GetEntries(BAD_ENTRY_IDS, metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details_bin = dict(error.trailing_metadata())["grpc-status-details-bin"]

    def decode(database: ProtoReflectionDescriptorDatabase, pool: descriptor_pool.DescriptorPool) -> list[Any]:
        status_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))
        status = status_class.FromString(details_bin)
        decoded = []
        for detail in status.details:
            name = detail.type_url.rpartition("/")[2]
            detail_class = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
            decoded.append((status.code, name, detail_class.FromString(detail.value)))
        return decoded

    decoded = await asyncio.to_thread(reflect, server.port, "v1", decode)
    bad_requests = [message for code, name, message in decoded if name == "google.rpc.BadRequest"]
    assert {code for code, _, _ in decoded} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    assert [v.field for m in bad_requests for v in m.field_violations] == ["entry_ids[0]"]


def buf_curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert BUF, "buf is not installed (pip install buf-bin, part of the dev extra)"
    return subprocess.run(
        [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1", *args],
        capture_output=True, text=True, timeout=30,
    )


async def test_buf_curl_lists_services_and_prints_error_details_over_reflection_v1(
    server: NexusServer,
) -> None:
    url = f"http://127.0.0.1:{server.port}"
    listed = await asyncio.to_thread(buf_curl, "--list-services", url)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {*SERVICE_NAMES, "grpc.health.v1.Health", *REFLECTION_SERVICES}

    authorization = dict(SERVICE)["authorization"]
    called = await asyncio.to_thread(
        buf_curl, "-H", f"authorization: {authorization}",
        "-d", json.dumps({"entry_ids": ["not-a-uuid"]}), f"{url}/nexus.v1.InteractionService/GetEntries",
    )
    assert called.returncode != 0
    error = json.loads(called.stderr)
    assert error["code"] == "invalid_argument", error
    # buf curl gives each detail's type (from its type URL) and its bytes.
    (bad_request,) = [d for d in error["details"] if d["type"] == "google.rpc.BadRequest"]
    value = base64.urlsafe_b64decode(bad_request["value"] + "=" * (-len(bad_request["value"]) % 4))
    violations = error_details_pb2.BadRequest.FromString(value).field_violations
    assert [v.field for v in violations] == ["entry_ids[0]"]


async def test_health_list_reports_every_service(clients: Clients) -> None:
    response = await health_pb2_grpc.HealthStub(clients.channel).List(health_pb2.HealthListRequest(), timeout=5)
    assert dict(response.statuses) == {
        name: health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        for name in ("", *SERVICE_NAMES, CLUSTER_HEALTH)
    }


async def test_health_check_of_an_unknown_service_is_not_found(clients: Clients) -> None:
    stub = health_pb2_grpc.HealthStub(clients.channel)
    error = await rpc_error(stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
