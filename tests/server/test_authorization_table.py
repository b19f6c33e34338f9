"""Default-deny authorization: every RPC the server serves has exactly one entry in
server/authorization.py's table, and an RPC without one is refused.

The first test is what makes a new RPC fail CI until someone decides its access: it asks
the running server (through reflection) for every service and method it serves and
compares them with the table, in both directions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ferrule.client import PermissionDenied
from ferrule.v1 import analysis_service_pb2 as apb
from ferrule.v1 import health_service_pb2, prediction_service_pb2, user_service_pb2
from server.app import build_authenticator
from server.authorization import RPC_ACCESS, Access
from server.interceptors.auth import AuthInterceptor
from server.interceptors.call_context import CallContextInterceptor
from server.interceptors.errors import ErrorMappingInterceptor
from server.interceptors.scoped import Context
from tests.server.conftest import ADMIN_TOKEN, RunningServer, server_settings


def _served_methods(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        return {
            f"/{name}/{method.name}"
            for name in database.get_services()
            for method in pool.FindServiceByName(name).methods
        }


async def test_every_served_rpc_has_exactly_one_table_entry(pg_server: RunningServer) -> None:
    served = await asyncio.to_thread(_served_methods, pg_server.target)
    # The contract's own descriptors too, in case reflection ever lists fewer services.
    for module in (user_service_pb2, apb, prediction_service_pb2, health_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            served |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    missing = sorted(served - RPC_ACCESS.keys())
    stale = sorted(RPC_ACCESS.keys() - served)
    assert missing == [], f"add these RPCs to server/authorization.py's RPC_ACCESS: {missing}"
    assert stale == [], f"these RPC_ACCESS entries name no served RPC: {stale}"
    anonymous = {m for m, access in RPC_ACCESS.items() if access is Access.ANONYMOUS}
    assert {m.split("/")[1] for m in anonymous} == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


# --- an RPC missing from the table ------------------------------------------------------


async def _echo(request: bytes, context: Context) -> bytes:
    return request


@pytest.fixture
async def partial_table_server() -> AsyncIterator[str]:
    """A server whose table names /t.T/Known (read) but not /t.T/Unknown."""
    table = MappingProxyType({"/t.T/Known": Access.READ})
    authenticator = build_authenticator(server_settings("sqlite+aiosqlite:///:memory:"))
    server = grpc.aio.server(
        interceptors=[
            CallContextInterceptor(),
            ErrorMappingInterceptor(),
            AuthInterceptor(authenticator, table),
        ]
    )
    handlers: dict[str, Any] = {
        "Known": grpc.unary_unary_rpc_method_handler(_echo),
        "Unknown": grpc.unary_unary_rpc_method_handler(_echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_an_rpc_missing_from_the_table_is_refused_even_for_the_admin(
    partial_table_server: str,
) -> None:
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    async with grpc.aio.insecure_channel(partial_table_server) as channel:
        known: Any = channel.unary_unary("/t.T/Known")
        unknown: Any = channel.unary_unary("/t.T/Unknown")
        assert await known(b"x", metadata=admin, timeout=5) == b"x"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unknown(b"x", metadata=admin, timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "authorization table" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await known(b"x", timeout=5)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tenants_cannot_read_the_process_health_report(pg_server: RunningServer) -> None:
    org = await pg_server.admin().users.CreateOrganization(
        user_service_pb2.CreateOrganizationRequest(
            organization=user_service_pb2.Organization(display_name="t")
        )
    )
    tenant = pg_server.for_org(org.name.split("/")[1], scope="read write")
    with pytest.raises(PermissionDenied) as refused:
        await tenant.health.GetHealthReport(health_service_pb2.GetHealthReportRequest())
    assert refused.value.reason == "MISSING_SCOPE"
