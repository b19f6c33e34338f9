"""Single-row reads on the pooled connection's driver, without an ORM session.

Why: a Get by name is the hottest read (every cache miss is one). Through an
``AsyncSession`` it pays for the ORM session, a greenlet hop per statement, and four
round trips (BEGIN, the settings statement, the SELECT, COMMIT); each loopback round
trip costs system-call CPU in ``send`` as well as latency, so the round trips matter as
much as the Python. Two paths, both on asyncpg directly:

* **Session-scoped (one round trip)**, on the primary when the point-read pool exists
  (:mod:`db.point_read_pool`, built by :func:`db.engine.create_point_read_pool`):
  connections that serve nothing but point reads, read-only for their whole session,
  carry the tenant and role as *session* settings. A read sends just the SELECT
  (autocommit); the settings statement runs only when the connection last served another
  tenant (tracked on the pooled connection), so one hot tenant pays it once per
  connection. The RPC deadline bounds the statement through asyncpg's timeout, which
  cancels it on the server.
* **Transaction-scoped (three round trips)** everywhere else (replicas, PgBouncer in
  transaction mode, where session state would leak to other clients): ``BEGIN READ
  ONLY`` plus the same transaction-local settings :mod:`db.session` sets in one
  simple-query batch, the SELECT, ``COMMIT``.

What stays the same: SQLAlchemy builds every statement (a Core select compiled once per
dialect, its bind and result processors applied, so rows carry the same Python types as
through a session); row-level security applies and the select filters by organization
as well; statements are commented, traced, timed and digested by the engine's
:class:`~db.observability.EngineObserver`; errors leave as :mod:`db.errors` types. SQLite
has no such shortcut to take and runs the select in an ordinary transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Numeric, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeEngine
from sqlalchemy.util import greenlet_spawn

from db.error_translation import translate_error
from db.errors import DatabaseUnavailableError, StatementTimeoutError
from db.observability import EngineObserver, observer_of
from db.point_read_pool import PointReadConnection, PointReadPool
from db.session import open_transaction
from db.tenancy import Tenant

Processor = Callable[[Any], Any] | None

# A role name is inlined into the transaction-scoped settings batch (a simple query takes
# no parameters); DatabaseConfig refuses any other, so it can never carry SQL.
ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")

# Session-scoped settings, on point-read connections only (they serve nothing else).
_SESSION_SETTINGS = (
    "SELECT set_config('ferrule.organization_id', $1, false),"
    " set_config('ferrule.all_organizations', $2, false)"
)
_SESSION_SETTINGS_AND_ROLE = _SESSION_SETTINGS + ", set_config('role', $3, false)"


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    #: Each positional parameter's bind name and processor, in the statement's order.
    binds: tuple[tuple[str, Processor], ...]
    #: Values of binds the statement carries itself (``literal(...)``), by name.
    defaults: Mapping[str, Any]
    #: The result columns that have a processor, by position; the others pass as the
    #: driver returns them. Kept apart so a read walks only these (most columns of a
    #: row, strings and UUIDs, need none).
    processed: tuple[tuple[int, Callable[[Any], Any]], ...]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The driver's positional arguments: ``params`` (else the statement's own
        values) through the bind processors."""
        args = []
        for name, process in self.binds:
            value = params[name] if name in params else self.defaults[name]
            args.append(value if process is None else process(value))
        return args

    def row(self, record: Sequence[Any]) -> tuple[Any, ...]:
        """The driver's row with the result processors applied (None stays None)."""
        values = list(record)
        for index, process in self.processed:
            value = values[index]
            if value is not None:
                values[index] = process(value)
        return tuple(values)


class PointRead:
    """A select returning at most one row, compiled once per dialect."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def compiled(self, dialect: Dialect) -> _Compiled:
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled: Any = self.statement.compile(dialect=dialect)
            names = tuple(compiled.positiontup or ())
            binds = tuple(
                (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                for name in names
            )
            results = (
                _result_processor(column.type, dialect)
                for column in self.statement.selected_columns
            )
            processed = tuple(
                (index, process) for index, process in enumerate(results) if process is not None
            )
            defaults = {
                name: compiled.binds[name].value
                for name in names
                if compiled.binds[name].value is not None
            }
            found = _Compiled(str(compiled), binds, defaults, processed)
            self._compiled[dialect.name] = found
        return found


# PostgreSQL type OIDs, for result processors that ask what the server sent.
_FLOAT8_OID = 701
_NUMERIC_OID = 1700


def _result_processor(type_: TypeEngine[Any], dialect: Dialect) -> Processor:
    """The processor SQLAlchemy would apply to a column of ``type_``.

    SQLAlchemy passes the driver's reported column type (``cursor.description``), which a
    bare ``fetchrow`` does not give; only the numeric types look at it (a float8 or a
    numeric from the server decides whether a value needs converting to float or
    Decimal). Their server type follows from the SQLAlchemy type for a column or a cast:
    float4/float8 for ``Float`` and its kinds, numeric for other ``Numeric`` types."""
    impl = type_.dialect_impl(dialect)
    underlying: TypeEngine[Any] = impl
    while isinstance(underlying, TypeDecorator):
        underlying = underlying.impl_instance
    coltype = None
    if isinstance(underlying, Float):
        coltype = _FLOAT8_OID
    elif isinstance(underlying, Numeric):
        coltype = _NUMERIC_OID
    return impl.result_processor(dialect, coltype)


def _settings_batch(tenant: Tenant, timeout_ms: int | None, role: str | None) -> str:
    """``BEGIN READ ONLY`` and the transaction-local settings, as one simple query.

    Every inlined value is one this module produced or validated: a UUID's canonical
    text, ``on``/``off``, an integer, a role name matching :data:`ROLE_NAME`."""
    organization = str(tenant.organization_id) if tenant.organization_id else ""
    settings = [
        f"set_config('ferrule.organization_id', '{organization}', true)",
        f"set_config('ferrule.all_organizations', '{'on' if tenant.all_organizations else 'off'}',"
        " true)",
        f"set_config('statement_timeout', '{max(int(timeout_ms), 1) if timeout_ms else 0}', true)",
    ]
    if role:
        settings.append(f"set_config('role', '{role}', true)")
    return "BEGIN READ ONLY; SELECT " + ", ".join(settings)


@dataclass(frozen=True, slots=True)
class PointReader:
    """Runs :class:`PointRead` selects for one tenant (see the module docstring).

    Built by :meth:`db.engine.Database.point_reader`."""

    tenant: Tenant
    timeout_ms: int | None
    #: The database the read must see (the primary, or a replica).
    engine: AsyncEngine
    #: The point-read pool when ``engine`` is the primary and the pool exists, else None:
    #: a read takes the session-scoped path exactly when this is set.
    point_read_pool: PointReadPool | None
    app_role: str | None

    async def fetch_row(self, read: PointRead, params: Mapping[str, Any]) -> Sequence[Any] | None:
        """The row, with the columns' Python types, or None."""
        if self.engine.dialect.name != "postgresql":
            return await self._fetch_in_session(read, params)
        compiled = read.compiled(self.engine.dialect)
        args = compiled.args(params)
        try:
            record = await self._fetch_on_driver(compiled.sql, args)
        except Exception as exc:
            mapped = translate_error(exc)
            if mapped is not None and mapped is not exc:
                raise mapped from exc
            raise
        if record is None:
            return None
        return compiled.row(record)

    async def _fetch_in_session(
        self, read: PointRead, params: Mapping[str, Any]
    ) -> Sequence[Any] | None:
        async with open_transaction(
            AsyncSession(bind=self.engine, expire_on_commit=False),
            self.tenant,
            timeout_ms=self.timeout_ms,
            read_only=True,
            app_role=self.app_role,
        ) as session:
            connection = await session.connection()
            row: Sequence[Any] | None = (
                await connection.execute(read.statement, dict(params))
            ).first()
            return row

    async def _fetch_on_driver(self, sql: str, args: list[Any]) -> Any:
        if self.point_read_pool is not None:
            return await self._fetch_session_scoped(self.point_read_pool, sql, args)
        return await self._fetch_in_transaction(sql, args)

    async def _fetch_session_scoped(self, pool: PointReadPool, sql: str, args: list[Any]) -> Any:
        observer = observer_of(pool.engine)
        started = time.perf_counter()
        connection = await pool.checkout()
        try:
            if observer is not None:
                observer.checked_out(connection.info, time.perf_counter() - started)
            await self._set_session_tenant(connection)
            timeout = self.timeout_ms / 1000 if self.timeout_ms else None
            return await self._observed_fetch(
                observer, connection.driver, connection.info, sql, args, timeout
            )
        except Exception as exc:
            lost = _lost_connection(connection.driver, exc)
            if lost is None:
                raise
            raise lost from exc
        finally:
            pool.checkin(connection)

    async def _fetch_in_transaction(self, sql: str, args: list[Any]) -> Any:
        """On a connection of ``engine``'s own pool: the settings batch, the SELECT, COMMIT."""
        engine = self.engine
        observer = observer_of(engine)
        # The pooled DBAPI connection itself, not an AsyncConnection around it: that
        # wrapper's bookkeeping would be paid per read and nothing here executes through it.
        # Checkout and return still run the pool's events (pre-ping).
        started = time.perf_counter()
        pooled = await engine.raw_connection()
        if observer is not None:
            observer.checked_out(pooled.info, time.perf_counter() - started)
        try:
            driver: Any = pooled.driver_connection
            try:
                await driver.execute(_settings_batch(self.tenant, self.timeout_ms, self.app_role))
                # statement_timeout is set in the transaction
                record = await self._observed_fetch(observer, driver, pooled.info, sql, args, None)
                await driver.execute("COMMIT")
            except BaseException as exc:
                await asyncio.shield(_end_or_discard(pooled, driver))
                lost = _lost_connection(driver, exc) if isinstance(exc, Exception) else None
                if lost is None:
                    raise
                raise lost from exc
        finally:
            # With no transaction open, returning the connection never suspends, so a
            # cancellation cannot land in the middle of it.
            await greenlet_spawn(pooled.close)
        return record

    @classmethod
    async def _observed_fetch(
        cls,
        observer: EngineObserver | None,
        driver: Any,
        info: dict[Any, Any],
        sql: str,
        args: list[Any],
        limit_s: float | None,
    ) -> Any:
        """The row; the statement commented, traced and timed when ``observer`` is set.
        ``info``: the pooled connection's (the checkout's wait, for the span)."""
        if observer is None:
            return await cls._fetch(driver, sql, args, limit_s)
        text, pending = observer.start(sql, args, info)
        try:
            record = await cls._fetch(driver, text, args, limit_s)
        except BaseException as exc:
            observer.finish(pending, -1, exc)
            raise
        observer.finish(pending, 0 if record is None else 1, None)
        return record

    @staticmethod
    async def _fetch(driver: Any, sql: str, args: list[Any], limit_s: float | None) -> Any:
        try:
            return await driver.fetchrow(sql, *args, timeout=limit_s)
        except TimeoutError as exc:  # asyncpg cancelled the statement on the server
            raise StatementTimeoutError(
                "the statement ran past its deadline and was cancelled"
            ) from exc

    async def _set_session_tenant(self, connection: PointReadConnection) -> None:
        """Point the connection's session settings at this tenant, unless they are."""
        role = self.app_role
        wanted = (
            str(self.tenant.organization_id) if self.tenant.organization_id else "",
            "on" if self.tenant.all_organizations else "off",
            role or "",
        )
        if connection.settings == wanted:
            return
        # Forget the old value first: if this fails or is cancelled half-way, the next
        # borrower sets the tenant again rather than trusting a stale record.
        connection.settings = None
        if role:
            await connection.driver.execute(_SESSION_SETTINGS_AND_ROLE, *wanted)
        else:
            await connection.driver.execute(_SESSION_SETTINGS, *wanted[:2])
        connection.settings = wanted


def _lost_connection(driver: Any, exc: Exception) -> DatabaseUnavailableError | None:
    """Retryable unavailability when ``exc`` is only the driver noticing that the
    connection closed under the read (the server ended the backend as the statement was
    sent: an interface error, not a server's); None for every other failure."""
    if driver.is_closed() and translate_error(exc) is None:
        return DatabaseUnavailableError("the database connection was lost")
    return None


async def _end_or_discard(pooled: Any, driver: Any) -> None:
    """Roll back whatever is open; a connection that cannot, or that has closed, is
    dropped from the pool, so no transaction (or half-read reply, or dead connection)
    ever reaches the next borrower."""
    try:
        if driver.is_closed():
            raise ConnectionError("the connection has closed")
        if driver.is_in_transaction():
            await driver.execute("ROLLBACK")
    except Exception:
        with contextlib.suppress(Exception):
            await greenlet_spawn(pooled.invalidate)
