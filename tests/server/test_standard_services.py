"""What answers without credentials (health, reflection) and what does not (everything else)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ferrule.client import Unauthenticated
from ferrule.v1 import analysis_service_pb2 as apb
from ferrule.v1 import health_service_pb2 as hpb
from ferrule.v1 import prediction_service_pb2 as ppb
from ferrule.v1 import user_service_pb2 as upb
from server.health import LIVENESS_SERVICE
from tests.server import pg_cluster
from tests.server.conftest import JWT_SECRET, RunningServer, StartServer

FERRULE_SERVICES = {
    "ferrule.v1.UserService",
    "ferrule.v1.AnalysisService",
    "ferrule.v1.PredictionService",
    "ferrule.v1.HealthService",
}


async def test_health_and_reflection_answer_without_credentials(
    pg_server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(pg_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", *sorted(FERRULE_SERVICES), LIVENESS_SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        listed = await health.List(health_pb2.HealthListRequest(), timeout=5)
        assert set(listed.statuses) == {"", *FERRULE_SERVICES, LIVENESS_SERVICE}
        assert {s.status for s in listed.statuses.values()} == {
            health_pb2.HealthCheckResponse.SERVING
        }
    # The reflection client is blocking: run it off the loop that serves the server.
    await asyncio.to_thread(_check_reflection, pg_server.target)


def _check_reflection(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert services >= FERRULE_SERVICES
        assert "grpc.health.v1.Health" in services
        pool = DescriptorPool(database)
        user_service = pool.FindServiceByName("ferrule.v1.UserService")
        assert "CreateUser" in user_service.methods_by_name
        stream = pool.FindServiceByName("ferrule.v1.PredictionService").methods_by_name[
            "StreamPredictions"
        ]
        assert stream.client_streaming
        assert stream.server_streaming


def _expired_token() -> str:
    claims = {"sub": "x", "org": "*", "scope": "read", "exp": int(time.time()) - 60}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@pytest.mark.parametrize("token", [None, "not-a-token", "expired"])
async def test_every_ferrule_service_refuses_missing_or_bad_credentials(
    pg_server: RunningServer, token: str | None
) -> None:
    client = pg_server.client(_expired_token() if token == "expired" else token)
    calls: list[Awaitable[Any]] = [
        client.users.ListOrganizations(upb.ListOrganizationsRequest()),
        client.analyses.ListAnalyses(apb.ListAnalysesRequest(parent="organizations/-")),
        client.predictions.ListPredictions(ppb.ListPredictionsRequest(parent="organizations/-")),
        client.health.GetHealthReport(hpb.GetHealthReportRequest()),
    ]
    for call in calls:
        with pytest.raises(Unauthenticated) as info:
            await call
        assert info.value.reason == "UNAUTHENTICATED"
        assert info.value.domain == "ferrule"


def _create_database(cluster: pg_cluster.Cluster, name: str) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())


async def test_health_watch_streams_serving_then_not_serving_when_the_database_goes(
    start_server: StartServer,
) -> None:
    """Client-side health checking and proxies use Watch: one stream, told of each change.

    The database is a private cluster this test stops (never the shared PostgreSQL)."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with pg_cluster.standalone_cluster() as cluster:
        await asyncio.to_thread(_create_database, cluster, "ferrule")
        server = await start_server(
            cluster.url("ferrule"), migrate=True, ferrule_health_probe_seconds=0.2
        )
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            overall = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            users = stub.Watch(health_pb2.HealthCheckRequest(service="ferrule.v1.UserService"))
            for watch in (overall, users):
                first = await asyncio.wait_for(watch.read(), 10)
                assert first.status == serving

            await asyncio.to_thread(cluster.stop)
            # The same streams carry the change; no new call, no polling by the client.
            for watch in (overall, users):
                changed = await asyncio.wait_for(watch.read(), 30)
                assert changed.status == not_serving
            # Liveness does not follow the database: restarting cannot bring it back.
            liveness = health_pb2.HealthCheckRequest(service="ferrule.liveness")
            assert (await stub.Check(liveness, timeout=5)).status == serving

            await asyncio.to_thread(cluster.start)
            for watch in (overall, users):
                back = await asyncio.wait_for(watch.read(), 30)
                assert back.status == serving
            overall.cancel()
            users.cancel()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_on_both_protocol_versions(
    pg_server: RunningServer, version: str
) -> None:
    """grpcurl and most current tools ask `grpc.reflection.v1` first; older ones v1alpha."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    requests = [
        rpb.ServerReflectionRequest(list_services=""),
        rpb.ServerReflectionRequest(file_containing_symbol="ferrule.v1.UserService"),
        rpb.ServerReflectionRequest(
            file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"
        ),
    ]
    async with grpc.aio.insecure_channel(pg_server.target) as channel:
        call = channel.stream_stream(
            method,
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        replies = [reply async for reply in call(iter(requests), timeout=5)]
    listed = {service.name for service in replies[0].list_services_response.service}
    assert listed >= FERRULE_SERVICES | {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    packages = ["ferrule.v1", f"grpc.reflection.{version}"]
    for reply, package in zip(replies[1:], packages, strict=True):
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        assert package in {f.package for f in files}, reply
