"""The point-read pool (db/point_read_pool.py): a bound on connections, first come first
served, timeouts, no connection lost to a cancelled borrower, dead and old connections
replaced, and closing; on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import func, select

from db.engine import Database, DatabaseConfig, PoolStatus, create_point_read_pool
from db.errors import DatabaseUnavailableError
from db.models import Organization
from db.point_read_pool import PointReadConnection, PointReadPool
from db.point_reads import PointRead
from db.tenancy import Tenant
from tests.polling import eventually


def _dsn(url: str) -> str:
    return url.replace("+asyncpg", "")


async def _connections_open(url: str) -> int:
    """Backends connected to this test's database, other than the one asking."""
    watcher = await asyncpg.connect(_dsn(url))
    try:
        count: int = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        return count
    finally:
        await watcher.close()


def _pool(url: str, **config: float | int | bool) -> PointReadPool:
    pool = create_point_read_pool(url, DatabaseConfig(url=url, **config))  # type: ignore[arg-type]
    assert pool is not None
    return pool


@pytest.fixture
async def pool(pg_database_url: str) -> AsyncIterator[PointReadPool]:
    pool = _pool(pg_database_url, point_read_pool_size=2, pool_timeout=5.0)
    yield pool
    await pool.close(5.0)


async def _backend_pid(connection: PointReadConnection) -> int:
    pid: int = await connection.driver.fetchval("SELECT pg_backend_pid()")
    return pid


async def _lent_pid(pool: PointReadPool) -> int:
    """The backend of the connection the pool lends next (returned at once)."""
    connection = await pool.checkout()
    try:
        return await _backend_pid(connection)
    finally:
        pool.checkin(connection)


async def _terminate(url: str, pid: int) -> None:
    """End backend ``pid`` from the server side, as an administrator would."""
    admin = await asyncpg.connect(_dsn(url))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_borrowers_beyond_the_size_wait_their_turn_in_order(
    pool: PointReadPool, pg_database_url: str
) -> None:
    first, second = await pool.checkout(), await pool.checkout()
    served: list[int] = []

    async def borrower(n: int) -> None:
        connection = await pool.checkout()
        served.append(n)
        pool.checkin(connection)

    waiting = [asyncio.create_task(borrower(n)) for n in range(5)]
    await asyncio.sleep(0.05)
    assert served == [] and pool.checked_out == 2
    pool.checkin(first)
    await asyncio.gather(*waiting)
    assert served == [0, 1, 2, 3, 4]
    pool.checkin(second)
    assert pool.checked_out == 0
    assert await _connections_open(pg_database_url) == 2


async def test_a_borrower_that_waits_too_long_is_told_the_database_is_unavailable(
    pg_database_url: str,
) -> None:
    pool = _pool(pg_database_url, point_read_pool_size=1, pool_timeout=0.1)
    try:
        held = await pool.checkout()
        with pytest.raises(DatabaseUnavailableError, match="no database connection"):
            await pool.checkout()
        pool.checkin(held)
        # The timed-out borrower left no trace: the next one gets the connection at once.
        again = await pool.checkout()
        assert again is held
        pool.checkin(again)
    finally:
        await pool.close(5.0)


async def test_a_cancelled_borrower_loses_no_connection(pool: PointReadPool) -> None:
    first, second = await pool.checkout(), await pool.checkout()
    for handed_over_first in (False, True):
        waiter = asyncio.create_task(pool.checkout())
        await asyncio.sleep(0.01)
        if handed_over_first:
            pool.checkin(first)  # handed to the waiter, which is cancelled before it runs
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        if not handed_over_first:
            continue
        # The connection the cancelled borrower was handed went back to the pool.
        assert pool.checked_out == 1
        first = await pool.checkout()
    pool.checkin(first)
    pool.checkin(second)
    assert pool.checked_out == 0
    both = await asyncio.gather(pool.checkout(), pool.checkout())
    assert {id(c) for c in both} == {id(first), id(second)}
    for connection in both:
        pool.checkin(connection)


async def test_a_connection_the_server_ended_is_replaced(
    pool: PointReadPool, pg_database_url: str
) -> None:
    old_pid = await _lent_pid(pool)
    await _terminate(pg_database_url, old_pid)
    # The closed connection is noticed when it is next lent (or fails one read, which
    # then closes it): within a few reads every answer comes from a live backend.
    pids = []
    for _ in range(4):
        with contextlib.suppress(
            asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError
        ):
            pids.append(await _lent_pid(pool))
    assert pids and old_pid not in pids
    assert pool.checked_out == 0


async def test_an_idle_connection_is_pinged_and_a_dead_one_replaced_before_use(
    pg_database_url: str,
) -> None:
    pool = _pool(pg_database_url, point_read_pool_size=1, pool_ping_idle_seconds=0)
    try:
        old_pid = await _lent_pid(pool)
        await _terminate(pg_database_url, old_pid)
        # Every read after the kill succeeds: the ping finds the dead connection first.
        for _ in range(3):
            assert await _lent_pid(pool) != old_pid
    finally:
        await pool.close(5.0)


async def test_an_idle_connection_that_answers_its_ping_is_kept(pg_database_url: str) -> None:
    pool = _pool(pg_database_url, point_read_pool_size=1, pool_ping_idle_seconds=0.05)
    try:
        connection = await pool.checkout()
        pid = await _backend_pid(connection)
        pool.checkin(connection)
        for _ in range(3):
            await asyncio.sleep(0.1)  # idle past the ping threshold: pinged, and kept
            again = await pool.checkout()
            assert again is connection and await _backend_pid(again) == pid
            pool.checkin(again)
    finally:
        await pool.close(5.0)


async def test_a_connection_older_than_the_recycle_age_is_retired(pg_database_url: str) -> None:
    pool = _pool(pg_database_url, point_read_pool_size=1, pool_recycle=0.2)
    try:
        old_pid = await _lent_pid(pool)
        await asyncio.sleep(0.3)
        assert await _lent_pid(pool) != old_pid
    finally:
        await pool.close(5.0)


async def test_closing_ends_every_connection_and_refuses_new_borrowers(
    pool: PointReadPool, pg_database_url: str
) -> None:
    lent = await pool.checkout()
    idle = await pool.checkout()
    pool.checkin(idle)
    await pool.close(5.0)
    with pytest.raises(DatabaseUnavailableError):
        await pool.checkout()
    pool.checkin(lent)  # returned after closing: closed, not kept

    async def none_open() -> bool:
        return await _connections_open(pg_database_url) == 0

    await eventually(none_open, what="every point-read connection closed")


async def test_its_connections_cannot_write(pool: PointReadPool) -> None:
    connection = await pool.checkout()
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await connection.driver.execute("CREATE TABLE nope (id int)")
    finally:
        pool.checkin(connection)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("pool_size", [1, 0], ids=["session-scoped", "transaction-scoped"])
async def test_a_read_as_the_server_ends_its_backend_fails_as_unavailable_or_succeeds(
    database_url: str, org_a: Organization, pool_size: int
) -> None:
    """The server may end a backend just as a read is sent on it: the driver then raises an
    interface error of its own, which must reach the caller as retryable unavailability
    (never an unmapped error), and the next reads succeed on a fresh connection."""
    database = Database(
        DatabaseConfig(url=database_url, point_read_pool_size=pool_size, pool_ping_idle_seconds=60)
    )
    reader = database.point_reader(Tenant.of(org_a.id))
    pid_read = PointRead(select(func.pg_backend_pid()))

    async def read_pid() -> int | None:
        try:
            row = await reader.fetch_row(pid_read, {})
        except DatabaseUnavailableError:
            return None
        assert row is not None
        pid: int = row[0]
        return pid

    admin = await asyncpg.connect(_dsn(database_url))
    try:
        killed = 0
        for _ in range(10):
            pid = await read_pid()
            if pid is not None:
                killed += await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await read_pid()
        # A connection the server ended fails at most one read, then is replaced.
        pids = [await read_pid() for _ in range(killed + 5)]
        assert None not in pids[-5:]
    finally:
        await admin.close()
        await database.dispose()


async def test_the_pool_gauges_name_the_point_read_pool_and_what_it_lends(
    pg_database_url: str,
) -> None:
    database = Database(DatabaseConfig(url=pg_database_url, point_read_pool_size=3))
    try:
        assert database.point_read_pool is not None
        lent = await database.point_read_pool.checkout()
        statuses = dict(database.pool_statuses())
        assert statuses["point_reads"] == PoolStatus(size=3, checked_out=1, overflow=0)
        assert statuses["primary"] == database.pool_status()
        database.point_read_pool.checkin(lent)
        assert dict(database.pool_statuses())["point_reads"].checked_out == 0
    finally:
        await database.dispose()
    without = Database(DatabaseConfig(url=pg_database_url, point_read_pool_size=0))
    try:
        assert [name for name, _ in without.pool_statuses()] == ["primary"]
    finally:
        await without.dispose()
