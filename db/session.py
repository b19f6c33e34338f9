"""The transaction helper: one session, one transaction, tenant settings, error translation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import ConnectionPoolEntry

from db.error_translation import translate_error
from db.models.base import MYSQL_DIALECTS
from db.observability import observer_of
from db.query_kill import kill_query
from db.tenancy import Tenant

logger = logging.getLogger(__name__)

#: Seconds a rollback, close or KILL QUERY may wait on the database when the caller sets
#: no bound (the server passes its grace period, see ``Database.cleanup_timeout``).
DEFAULT_CLEANUP_TIMEOUT = 10.0

# One round trip sets everything, transaction-local (is_local = true), so nothing leaks
# to the next user of the pooled (or PgBouncer-shared) connection. The role must come
# last: after it the session may no longer be allowed to change the other settings.
# client_connection_check_interval (PostgreSQL 14+) ends a statement whose client has
# gone: a cancelled RPC whose connection is dropped rather than rolled back (the cleanup
# bound, or the driver's own invalidation) would otherwise leave it running, holding its
# locks, until statement_timeout, since a backend reads its socket only between statements.
_SETTINGS = (
    "SELECT set_config('ferrule.organization_id', :organization_id, true),"
    " set_config('ferrule.all_organizations', :all_organizations, true),"
    " set_config('statement_timeout', :statement_timeout, true),"
    " set_config('client_connection_check_interval', '1s', true),"
    " set_config('transaction_read_only', :read_only, true)"
)
_SET_TENANT = text(_SETTINGS)
_SET_TENANT_AND_ROLE = text(_SETTINGS + ", set_config('role', :role, true)")


async def _apply_postgres_settings(
    session: AsyncSession,
    tenant: Tenant,
    timeout_ms: int | None,
    read_only: bool,
    app_role: str | None,
) -> None:
    params = {
        # An empty string, read through nullif(...)::uuid, matches no row.
        "organization_id": str(tenant.organization_id) if tenant.organization_id else "",
        "all_organizations": "on" if tenant.all_organizations else "off",
        "statement_timeout": str(max(int(timeout_ms), 1)) if timeout_ms else "0",
        "read_only": "on" if read_only else "off",
    }
    # On the session's connection (which begins the session's transaction): the same
    # statement and transaction without the ORM's per-execute machinery.
    connection = await session.connection()
    if app_role:
        params["role"] = app_role
        await connection.execute(_SET_TENANT_AND_ROLE, params)
    else:
        await connection.execute(_SET_TENANT, params)


# MariaDB bounds every statement (seconds); MySQL only SELECTs (milliseconds). Set first,
# before the transaction's first table access, so the read-only mode applies to it. The
# read-only mode has no scope keyword, so it is the next transaction's alone and ends with
# its commit or rollback: as a session value it would outlive the transaction and make the
# pooled connection read-only for a next user that does not set it (a migration, a
# maintenance task writing on the engine directly). The timeout has no transaction scope
# at all: it is a session value, so the connection's return to the pool puts it back to
# the server's default (:func:`reset_statement_timeout_on_return`), or such a next user
# would run under this transaction's bound.
_MARIADB_SETTINGS = text("SET @@session.max_statement_time = :seconds, @@tx_read_only = :read_only")
_MYSQL_SETTINGS = text(
    "SET @@session.max_execution_time = :ms, @@transaction_read_only = :read_only"
)
_MARIADB_RESET = "SET @@session.max_statement_time = DEFAULT"
_MYSQL_RESET = "SET @@session.max_execution_time = DEFAULT"
#: Key of the pooled connection's info: the statement that resets the timeout this
#: helper set on it.
_TIMEOUT_RESET = "ferrule.mysql_timeout_reset"


def reset_statement_timeout_on_return(engine: AsyncEngine) -> None:
    """Give a MariaDB/MySQL connection back to the pool with the session timeout of the
    server's default when the transaction helper changed it (one statement, before the
    pool's rollback); a failure there makes the pool drop the connection."""

    def on_reset(dbapi_connection: Any, record: ConnectionPoolEntry, state: Any) -> None:
        reset = record.info.pop(_TIMEOUT_RESET, None)
        if reset is None or state.terminate_only:
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(reset)
        finally:
            cursor.close()

    event.listen(engine.sync_engine, "reset", on_reset)


async def _apply_mysql_settings(
    session: AsyncSession, timeout_ms: int | None, read_only: bool
) -> int:
    """Statement timeout and read-only mode; returns the connection's server thread id
    (the handle ``KILL QUERY`` needs)."""
    connection = await session.connection()
    ms = max(int(timeout_ms), 1) if timeout_ms else 0
    if getattr(connection.dialect, "is_mariadb", False):
        await connection.execute(_MARIADB_SETTINGS, {"seconds": ms / 1000, "read_only": read_only})
        connection.info[_TIMEOUT_RESET] = _MARIADB_RESET
    else:
        await connection.execute(_MYSQL_SETTINGS, {"ms": ms, "read_only": read_only})
        connection.info[_TIMEOUT_RESET] = _MYSQL_RESET
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    thread_id: int = driver.thread_id()
    return thread_id


async def _abandon_mysql_statement(session: AsyncSession, thread_id: int) -> None:
    """After a cancellation: kill the statement the connection may still be running and
    drop the connection (its reply may still be unread on the socket)."""
    bind = session.get_bind()
    await kill_query(bind if isinstance(bind, Engine) else bind.engine, thread_id)
    with contextlib.suppress(Exception):
        await (await session.connection()).invalidate()


async def _check_out(session: AsyncSession) -> None:
    """Take the session's connection from the pool now, and report how long that took to
    the engine's observer: SQLAlchemy's pool has an event after a checkout, none before."""
    started = time.perf_counter()
    connection = await session.connection()
    observer = observer_of(connection.engine)
    if observer is not None:
        observer.checked_out(connection.info, time.perf_counter() - started)


async def bounded_cleanup(
    cleanup: Coroutine[Any, Any, Any],
    limit: float,
    connection: AsyncConnection | None,
) -> None:
    """Run ``cleanup`` shielded from cancellation, but for at most ``limit`` seconds.

    A second cancellation must not strand a connection checked out of the pool, so the
    cleanup outlives its caller's cancellation; but a stalled server must not hold the
    caller (and a server's shutdown) forever either: past ``limit`` the cleanup is
    cancelled and ``connection`` invalidated, which makes the pool terminate it rather
    than reuse it. Raises what the cleanup raised when it finished in time.
    """
    task = asyncio.ensure_future(cleanup)
    # asyncio.wait, unlike wait_for, leaves the task running when this caller is cancelled.
    done, _ = await asyncio.wait({task}, timeout=limit)
    if done:
        task.result()
        return
    task.cancel()
    logger.warning("database cleanup still waiting after %.1f s: connection dropped", limit)
    if connection is not None:
        with contextlib.suppress(Exception):
            await connection.invalidate()


@asynccontextmanager
async def open_transaction(
    session: AsyncSession,
    tenant: Tenant,
    *,
    timeout_ms: int | None,
    read_only: bool,
    app_role: str | None = None,
    cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
) -> AsyncIterator[AsyncSession]:
    """Run the body in one transaction on ``session``; commit on success, else roll back.

    Rollback and close are shielded so a second cancellation cannot strand a connection
    checked out of the pool, and each is bounded by ``cleanup_timeout`` (after which the
    connection is invalidated, see :func:`bounded_cleanup`); the original exception
    (translated when it is a database error, untouched when it is a cancellation) is
    re-raised.
    """
    mysql_thread: int | None = None
    connection: AsyncConnection | None = None
    try:
        try:
            await _check_out(session)
            # Established by now (no I/O): what a cleanup that hangs has to invalidate.
            connection = await session.connection()
            dialect = session.get_bind().dialect.name
            if dialect == "postgresql":
                await _apply_postgres_settings(session, tenant, timeout_ms, read_only, app_role)
            elif dialect in MYSQL_DIALECTS:
                mysql_thread = await _apply_mysql_settings(session, timeout_ms, read_only)
            yield session
            await session.commit()
        except BaseException as exc:
            if mysql_thread is not None and isinstance(exc, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await bounded_cleanup(
                        _abandon_mysql_statement(session, mysql_thread),
                        cleanup_timeout,
                        connection,
                    )
            # A failed rollback (connection already gone) must not mask the original error.
            with contextlib.suppress(Exception):
                await bounded_cleanup(session.rollback(), cleanup_timeout, connection)
            if isinstance(exc, Exception):
                mapped = translate_error(exc)
                if mapped is not None and mapped is not exc:
                    raise mapped from exc
            raise
    finally:
        await bounded_cleanup(session.close(), cleanup_timeout, connection)
