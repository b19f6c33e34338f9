"""Anonymous callers cannot take capacity from tenants.

Health Watch and reflection answer without credentials and a caller may hold their
streams open for as long as it likes; they count against their own small limit
(FERRULE_MAX_ANONYMOUS_STREAMS), never against the authenticated RPCs' limit
(FERRULE_MAX_CONCURRENT_RPCS). Here both limits are the same small number: with one
shared budget, the held anonymous streams alone would lock every tenant out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ferrule.v1 import user_service_pb2 as upb
from tests.polling import eventually
from tests.server.conftest import RunningServer, StartServer
from tests.server.reflection_status import reflection_status

pytestmark = pytest.mark.timeout(120)

LIMIT = 3


@pytest.fixture
async def limited(start_server: StartServer, pg_database_url: str) -> RunningServer:
    return await start_server(
        pg_database_url, ferrule_max_anonymous_streams=LIMIT, ferrule_max_concurrent_rpcs=LIMIT
    )


async def _open_watch(channel: grpc.aio.Channel, token: str | None = None) -> Any:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    watch: Any = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), metadata=metadata
    )
    first = await asyncio.wait_for(watch.read(), 10)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    return watch


async def _open_reflection(channel: grpc.aio.Channel) -> Any:
    """A reflection stream that answered once and is kept open (never half-closed)."""
    stream: Any = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await asyncio.wait_for(stream.read(), 10)
    assert reply.list_services_response.service
    return stream


async def _refused(opening: Coroutine[Any, Any, object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(opening, 10)
    code: grpc.StatusCode = refused.value.code()
    return code


@contextlib.asynccontextmanager
async def held_anonymous_streams(target: str) -> AsyncIterator[list[object]]:
    """LIMIT anonymous streams held open: Watch streams and a reflection stream."""
    async with grpc.aio.insecure_channel(target) as channel:
        held: list[grpc.aio.Call] = [await _open_watch(channel) for _ in range(LIMIT - 1)]
        held.append(await _open_reflection(channel))
        try:
            yield [channel, *held]
        finally:
            for call in held:
                call.cancel()


async def test_held_anonymous_streams_leave_tenants_capacity_alone(
    limited: RunningServer,
) -> None:
    admin = limited.admin()
    budgets = limited.app.capacity
    async with held_anonymous_streams(limited.target) as (channel, *_held):
        assert budgets.anonymous_streams.in_flight == LIMIT
        assert isinstance(channel, grpc.aio.Channel)
        # More anonymous streams than the limit: refused at once, with RESOURCE_EXHAUSTED.
        assert await _refused(_open_watch(channel)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await reflection_status(channel) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Tenants keep their whole budget: LIMIT concurrent calls, round after round.
        for round_number in range(5):
            created = await asyncio.gather(
                *(
                    admin.users.CreateOrganization(
                        upb.CreateOrganizationRequest(
                            organization=upb.Organization(display_name=f"r{round_number}-{i}")
                        ),
                        timeout=30,
                    )
                    for i in range(LIMIT)
                )
            )
            assert len({org.name for org in created}) == LIMIT
        # A health Check cannot be held open: probes keep answering while Watch is full.
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert budgets.anonymous_streams.in_flight == LIMIT
        # A Watch that carries a valid token is the tenant's: anonymous callers filling
        # their budget cannot lock out a client whose channel sends its credentials.
        credentialed = await _open_watch(channel, token=admin_token(limited))
        assert budgets.authenticated.in_flight == 1
        credentialed.cancel()
        # A bad token earns nothing.
        refused = await _refused(_open_watch(channel, token="not-a-valid-token"))
        assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Closing the held streams gives their slots back.
    await eventually(
        lambda: budgets.anonymous_streams.in_flight == 0, what="anonymous slots released"
    )
    async with grpc.aio.insecure_channel(limited.target) as channel:
        (await _open_watch(channel)).cancel()


async def test_the_tenants_limit_still_refuses_tenants_beyond_it(limited: RunningServer) -> None:
    """The authenticated budget is real: LIMIT calls held in flight refuse the next one.

    The calls are held by streams the server cannot finish (ExportPredictions would end;
    StreamPredictions stays open until the client half-closes)."""
    from ferrule.client import ResourceExhausted

    admin = limited.admin()
    org = await admin.users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="busy"))
    )
    budgets = limited.app.capacity
    async with grpc.aio.insecure_channel(limited.target) as channel:
        streams: list[Any] = [
            channel.stream_stream("/ferrule.v1.PredictionService/StreamPredictions")(
                metadata=(("authorization", f"Bearer {admin_token(limited)}"),)
            )
            for _ in range(LIMIT)
        ]
        try:
            await eventually(
                lambda: budgets.authenticated.in_flight == LIMIT, what="tenant slots held"
            )
            with pytest.raises(ResourceExhausted):
                await admin.users.GetOrganization(upb.GetOrganizationRequest(name=org.name))
        finally:
            for stream in streams:
                stream.cancel()
    await eventually(lambda: budgets.authenticated.in_flight == 0, what="tenant slots released")
    assert (await admin.users.GetOrganization(upb.GetOrganizationRequest(name=org.name))).name


def admin_token(server: RunningServer) -> str:
    token = server.app.settings.ferrule_admin_token
    assert token is not None
    return token.get_secret_value()
