"""On MariaDB too, a deadline bounds the statement and a cancelled RPC ends its query.

asyncmy cannot cancel a statement the way asyncpg does: the deadline becomes the
transaction's ``max_statement_time``, and a cancelled call's statement is ended with
``KILL QUERY`` from another connection (db/query_kill.py). A trigger that computes for a
long time makes CreateOrganization's INSERT slow on purpose (not SLEEP: that one notices
a closed client connection by itself, a computation does not); the processlist shows
whether it still runs. Unstopped, it would run into the server's default statement
timeout (30 s), so a broken stop shows as a failure, not as a hang.

Each test runs under both URL schemes a deployment may write, ``mariadb+asyncmy://`` and
``mysql+asyncmy://``: under the second SQLAlchemy's dialect is named ``mysql`` but still
detects MariaDB, so the bound must follow the server (``max_statement_time``; MySQL's
``max_execution_time`` does not exist on MariaDB), not the scheme.
"""

from __future__ import annotations

import asyncio

import pytest

from ferrule.client import DeadlineExceeded, FerruleError
from ferrule.v1 import user_service_pb2 as pb
from tests.conftest import query
from tests.server.conftest import RunningServer, StartServer
from tests.template_databases import mariadb_connect

#: Seconds within which a stopped statement must be gone (far below its natural run time).
SETTLE_SECONDS = 5
SLOW_TRIGGER = """
CREATE TRIGGER ferrule_test_slow BEFORE INSERT ON organizations FOR EACH ROW
BEGIN
  IF NEW.display_name LIKE 'slow%' THEN DO BENCHMARK(1000000000, MD5('ferrule')); END IF;
END
"""


@pytest.fixture(params=["mariadb+asyncmy", "mysql+asyncmy"])
async def slow_server(
    request: pytest.FixtureRequest, mariadb_database_url: str, start_server: StartServer
) -> RunningServer:
    scheme, _, rest = mariadb_database_url.partition("://")
    assert scheme == "mariadb+asyncmy"
    server = await start_server(f"{request.param}://{rest}")
    conn = await mariadb_connect(mariadb_database_url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(f"USE `{_database(server)}`")
            await cursor.execute(SLOW_TRIGGER)
    finally:
        conn.close()
    return server


def _database(server: RunningServer) -> str:
    return server.database_url.rsplit("/", 1)[1]


async def _slow_statements(server: RunningServer) -> int:
    """Statements of the server's database still inside the trigger (the processlist
    shows the trigger's statement while it runs)."""
    conn = await mariadb_connect(server.database_url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT count(*) FROM information_schema.processlist"
                " WHERE db = %s AND command = 'Query' AND info LIKE %s",
                (_database(server), "DO BENCHMARK%"),
            )
            (count,) = await cursor.fetchone()
            return int(count)
    finally:
        conn.close()


async def _settled(server: RunningServer, seconds: float) -> bool:
    """Poll (bounded) until no slow statement runs and no pooled connection is checked out."""
    for _ in range(int(seconds * 10)):
        if await _slow_statements(server) == 0 and (
            server.app.database.pool_status().checked_out == 0
        ):
            return True
        await asyncio.sleep(0.1)
    return False


async def _organizations(server: RunningServer) -> int:
    rows = await query(server.database_url, "SELECT count(*) FROM organizations")
    return int(rows[0][0])


async def test_deadline_expiring_mid_query_ends_the_query(slow_server: RunningServer) -> None:
    with pytest.raises(DeadlineExceeded):
        await slow_server.admin().users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name="slow one")),
            timeout=0.5,
        )
    assert await _settled(slow_server, SETTLE_SECONDS), "the slow query outlived its RPC"
    assert await _organizations(slow_server) == 0


async def test_a_cancelled_call_kills_its_query(slow_server: RunningServer) -> None:
    """No deadline to bound the statement (30 s): only KILL QUERY can end it early."""
    client = slow_server.admin()
    calls = [
        client.users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name=f"slow {i}")),
            timeout=30,
        )
        for i in range(5)
    ]
    for _ in range(100):  # bounded: until all five statements are running on the server
        if await _slow_statements(slow_server) == len(calls):
            break
        await asyncio.sleep(0.1)
    assert await _slow_statements(slow_server) == len(calls)
    for call in calls:
        call.cancel()
    for call in calls:
        with pytest.raises((asyncio.CancelledError, FerruleError)):
            await call
    assert await _settled(slow_server, SETTLE_SECONDS), "a cancelled call's query kept running"
    assert await _organizations(slow_server) == 0
    # The pool is healthy afterwards: a normal call succeeds.
    created = await client.users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name="fast"))
    )
    assert created.display_name == "fast"
