"""Overload: beyond FERRULE_MAX_CONCURRENT_RPCS, calls are refused at once, never queued.

A pg_sleep trigger (the pattern of test_deadlines.py) keeps the first RPCs busy in the
database, so more calls than the limit are genuinely concurrent. The excess must fail
with RESOURCE_EXHAUSTED while the slow ones still run: a server that queued them would
answer them only after a slow one finished.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from ferrule.client import ResourceExhausted
from ferrule.v1 import user_service_pb2 as pb
from tests.server.conftest import RunningServer, StartServer

pytestmark = pytest.mark.timeout(120)

LIMIT = 4
SLEEP_SECONDS = 4
SLOW_TRIGGER = f"""
CREATE FUNCTION ferrule_test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep({SLEEP_SECONDS}); RETURN NEW; END $$;
CREATE TRIGGER ferrule_test_slow BEFORE INSERT ON organizations
FOR EACH ROW WHEN (NEW.display_name LIKE 'slow%') EXECUTE FUNCTION ferrule_test_slow();
"""


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def limited_server(start_server: StartServer, pg_database_url: str) -> RunningServer:
    server = await start_server(pg_database_url, ferrule_max_concurrent_rpcs=LIMIT)
    conn = await asyncpg.connect(_dsn(pg_database_url))
    try:
        await conn.execute(SLOW_TRIGGER)
    finally:
        await conn.close()
    return server


async def _create(server: RunningServer, display_name: str) -> tuple[str, float]:
    """('ok' | 'exhausted', seconds from call to answer)."""
    client = server.admin()
    started = time.monotonic()
    try:
        await client.users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name=display_name)),
            timeout=60,
        )
        outcome = "ok"
    except ResourceExhausted:
        outcome = "exhausted"
    return outcome, time.monotonic() - started


async def test_calls_beyond_the_limit_get_resource_exhausted_without_queueing(
    limited_server: RunningServer,
) -> None:
    # Occupy every slot first, then flood: the flood must bounce while the slots are busy.
    slow = [asyncio.create_task(_create(limited_server, f"slow {i}")) for i in range(LIMIT)]
    await asyncio.sleep(1.0)  # let the slow calls reach pg_sleep
    assert not any(task.done() for task in slow), "the slow calls were not slow"

    excess = await asyncio.gather(*(_create(limited_server, f"slow x{i}") for i in range(12)))
    still_running = [task for task in slow if not task.done()]

    assert [outcome for outcome, _ in excess] == ["exhausted"] * len(excess)
    # Refused while every slow call still held its slot: nothing waited for a free slot.
    assert len(still_running) == LIMIT
    # A loose bound (the slow calls take SLEEP_SECONDS): refusals do not wait for them.
    assert max(seconds for _, seconds in excess) < SLEEP_SECONDS

    # The slots were held by real work that completes normally.
    assert [outcome for outcome, _ in await asyncio.gather(*slow)] == ["ok"] * LIMIT
    conn = await asyncpg.connect(_dsn(limited_server.database_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM organizations") == LIMIT
    finally:
        await conn.close()


async def test_capacity_comes_back_after_overload(limited_server: RunningServer) -> None:
    flood = [_create(limited_server, f"slow {i}") for i in range(3 * LIMIT)]
    outcomes = [outcome for outcome, _ in await asyncio.gather(*flood)]
    assert outcomes.count("ok") >= 1
    assert set(outcomes) <= {"ok", "exhausted"}
    assert "exhausted" in outcomes
    # Slots are released: a burst of LIMIT fast calls now all succeed.
    fast = await asyncio.gather(*(_create(limited_server, f"fast {i}") for i in range(LIMIT)))
    assert [outcome for outcome, _ in fast] == ["ok"] * LIMIT
