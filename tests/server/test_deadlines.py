"""Every RPC honours its deadline down to the database, and cancellation cleans up.

A trigger that calls pg_sleep makes CreateOrganization's INSERT slow on purpose, so the
test exercises the real path: deadline -> statement_timeout -> cancelled query.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ferrule.client import DeadlineExceeded, FerruleError
from ferrule.v1 import user_service_pb2 as pb
from tests.polling import eventually
from tests.server.conftest import RunningServer

SLOW_TRIGGER = """
CREATE FUNCTION ferrule_test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(600); RETURN NEW; END $$;
CREATE TRIGGER ferrule_test_slow BEFORE INSERT ON organizations
FOR EACH ROW WHEN (NEW.display_name LIKE 'slow%') EXECUTE FUNCTION ferrule_test_slow();
"""


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _our_backends(conn: asyncpg.Connection, database: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT pid, state, query, wait_event FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    )


def _in_pg_sleep(backend: asyncpg.Record) -> bool:
    """In the trigger's pg_sleep (the statement text is the INSERT that fired it)."""
    return bool(backend["state"] == "active" and backend["wait_event"] == "PgSleep")


async def _sleeping(server: RunningServer) -> bool:
    conn = await asyncpg.connect(_dsn(server.database_url))
    try:
        database = server.database_url.rsplit("/", 1)[1]
        backends = await _our_backends(conn, database)
        return any(_in_pg_sleep(r) for r in backends)
    finally:
        await conn.close()


@pytest.fixture
async def slow_pg_server(pg_server: RunningServer) -> RunningServer:
    conn = await asyncpg.connect(_dsn(pg_server.database_url))
    try:
        await conn.execute(SLOW_TRIGGER)
    finally:
        await conn.close()
    return pg_server


async def test_deadline_expiring_mid_query_cancels_the_query(
    slow_pg_server: RunningServer,
) -> None:
    client = slow_pg_server.admin()
    with pytest.raises(DeadlineExceeded):
        await client.users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name="slow one")),
            timeout=0.5,
        )
    database = slow_pg_server.database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(_dsn(slow_pg_server.database_url))
    try:

        async def slow_query_gone() -> bool:
            return not [r for r in await _our_backends(conn, database) if _in_pg_sleep(r)]

        # pg_sleep(600) outlasts the wait: only a cancelled statement ends in time.
        await eventually(slow_query_gone, what="the slow query ending with its RPC")
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 0
    finally:
        await conn.close()


async def test_cancelled_calls_leave_no_connection_checked_out(
    slow_pg_server: RunningServer,
) -> None:
    client = slow_pg_server.admin()
    for batch in range(4):  # 200 calls, 50 at a time, each cancelled mid-query
        calls = [
            client.users.CreateOrganization(
                pb.CreateOrganizationRequest(
                    organization=pb.Organization(display_name=f"slow {batch}-{i}")
                ),
                timeout=600,  # longer than any wait below: only cancelling ends them
            )
            for i in range(50)
        ]
        await eventually(  # some calls are mid-query when they are cancelled
            lambda: _sleeping(slow_pg_server), what="calls waiting in pg_sleep"
        )
        for call in calls:
            call.cancel()
        for call in calls:
            with pytest.raises((asyncio.CancelledError, FerruleError)):
                await call
    database = slow_pg_server.database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(_dsn(slow_pg_server.database_url))
    try:
        unsettled: list[object] = []

        async def settled() -> bool:
            backends = await _our_backends(conn, database)
            busy = [r for r in backends if r["state"] in ("active", "idle in transaction")]
            checked_out = slow_pg_server.app.database.pool_status().checked_out
            unsettled[:] = [f"checked out: {checked_out}", *(dict(r) for r in busy)]
            return checked_out == 0 and not busy

        try:
            await eventually(settled, what="no connection checked out or busy after cancellations")
        except AssertionError as failed:
            raise AssertionError(f"{failed}; still: {unsettled}") from None
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 0
    finally:
        await conn.close()
