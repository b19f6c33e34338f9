"""Overload: beyond FERRULE_MAX_CONCURRENT_RPCS, calls are refused at once, never queued.

A trigger makes the first RPCs wait in the database on an advisory lock that the test
holds, so more calls than the limit are genuinely concurrent for as long as the test
needs, however slow the machine. The excess must fail with RESOURCE_EXHAUSTED while the
held ones still wait: a server that queued the excess could not answer it before the
test releases the lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from ferrule.client import ResourceExhausted
from ferrule.v1 import user_service_pb2 as pb
from tests.polling import eventually
from tests.server.conftest import RunningServer, StartServer

pytestmark = pytest.mark.timeout(180)

LIMIT = 4
#: The advisory lock (per database) that holds back inserts of organizations named "held…".
HOLD_KEY = 4242
HOLD_TRIGGER = f"""
CREATE FUNCTION ferrule_test_hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_advisory_lock_shared({HOLD_KEY});
  PERFORM pg_advisory_unlock_shared({HOLD_KEY});
  RETURN NEW;
END $$;
CREATE TRIGGER ferrule_test_hold BEFORE INSERT ON organizations
FOR EACH ROW WHEN (NEW.display_name LIKE 'held%') EXECUTE FUNCTION ferrule_test_hold();
"""


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def limited_server(start_server: StartServer, pg_database_url: str) -> RunningServer:
    server = await start_server(pg_database_url, ferrule_max_concurrent_rpcs=LIMIT)
    conn = await asyncpg.connect(_dsn(pg_database_url))
    try:
        await conn.execute(HOLD_TRIGGER)
    finally:
        await conn.close()
    return server


@asynccontextmanager
async def held(server: RunningServer) -> AsyncIterator[asyncpg.Connection]:
    """Inserts of "held…" organizations wait until this block ends."""
    conn = await asyncpg.connect(_dsn(server.database_url))
    try:
        await conn.execute(f"SELECT pg_advisory_lock({HOLD_KEY})")
        yield conn
        await conn.execute(f"SELECT pg_advisory_unlock({HOLD_KEY})")
    finally:
        await conn.close()


async def waiting_on_the_lock(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"
        " AND NOT granted AND database = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())",
        HOLD_KEY,
    )
    return count


async def _create(server: RunningServer, display_name: str) -> str:
    """'ok' or 'exhausted'."""
    try:
        await server.admin().users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name=display_name)),
            timeout=120,
        )
    except ResourceExhausted:
        return "exhausted"
    return "ok"


async def test_calls_beyond_the_limit_get_resource_exhausted_without_queueing(
    limited_server: RunningServer,
) -> None:
    async with held(limited_server) as conn:
        # Occupy every slot first, then flood: the flood must bounce while the slots are busy.
        slow = [asyncio.create_task(_create(limited_server, f"held {i}")) for i in range(LIMIT)]
        await eventually(
            lambda: _all_waiting(conn),
            what="every slot held by a call waiting in the database",
        )
        excess = await asyncio.gather(*(_create(limited_server, f"held x{i}") for i in range(12)))
        # Answered while every held call still waited for the lock: nothing was queued.
        assert excess == ["exhausted"] * len(excess)
        assert not any(task.done() for task in slow)
    # The slots were held by real work that completes normally.
    assert await asyncio.gather(*slow) == ["ok"] * LIMIT
    conn = await asyncpg.connect(_dsn(limited_server.database_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM organizations") == LIMIT
    finally:
        await conn.close()


async def _all_waiting(conn: asyncpg.Connection) -> bool:
    return await waiting_on_the_lock(conn) == LIMIT


async def test_capacity_comes_back_after_overload(limited_server: RunningServer) -> None:
    async with held(limited_server) as conn:
        flood = [
            asyncio.create_task(_create(limited_server, f"held {i}")) for i in range(3 * LIMIT)
        ]
        await eventually(
            lambda: _all_waiting(conn), what="every slot held by a call waiting in the database"
        )
        # Every call but the held ones has been refused by now.
        await eventually(
            lambda: sum(task.done() for task in flood) == 2 * LIMIT,
            what="the calls beyond the limit answered",
        )
    outcomes = await asyncio.gather(*flood)
    assert sorted(outcomes) == ["exhausted"] * (2 * LIMIT) + ["ok"] * LIMIT
    # Slots are released: a burst of LIMIT fast calls now all succeed.
    fast = await asyncio.gather(*(_create(limited_server, f"fast {i}") for i in range(LIMIT)))
    assert fast == ["ok"] * LIMIT
