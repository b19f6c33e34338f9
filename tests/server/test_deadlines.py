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
from tests.server.conftest import RunningServer

SLOW_TRIGGER = """
CREATE FUNCTION ferrule_test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(5); RETURN NEW; END $$;
CREATE TRIGGER ferrule_test_slow BEFORE INSERT ON organizations
FOR EACH ROW WHEN (NEW.display_name LIKE 'slow%') EXECUTE FUNCTION ferrule_test_slow();
"""


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _our_backends(conn: asyncpg.Connection, database: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT pid, state, query FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    )


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
        for _ in range(50):  # bounded: up to ~5 s for the backend to notice
            running = [
                r
                for r in await _our_backends(conn, database)
                if "pg_sleep" in (r["query"] or "") and r["state"] == "active"
            ]
            if not running:
                break
            await asyncio.sleep(0.1)
        assert not running, f"the slow query outlived its RPC: {running}"
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
                timeout=30,
            )
            for i in range(50)
        ]
        await asyncio.sleep(0.3)
        for call in calls:
            call.cancel()
        for call in calls:
            with pytest.raises((asyncio.CancelledError, FerruleError)):
                await call
    database = slow_pg_server.database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(_dsn(slow_pg_server.database_url))
    try:
        for _ in range(100):  # bounded: up to ~10 s for cancellations to settle
            pool = slow_pg_server.app.database.pool_status()
            backends = await _our_backends(conn, database)
            busy = [r for r in backends if r["state"] in ("active", "idle in transaction")]
            if pool.checked_out == 0 and not busy:
                break
            await asyncio.sleep(0.1)
        assert pool.checked_out == 0
        assert not busy, busy
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 0
    finally:
        await conn.close()
