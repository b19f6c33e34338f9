"""Single-row reads on the pooled connection's driver, without an ORM session.

Why: a Get by name is the hottest read (every cache miss is one), and through an
``AsyncSession`` it cost 1,094 us of CPU per read against 257 us this way (measured in one
process, 16 concurrent readers, PostgreSQL on loopback). The session path pays the ORM
session, a greenlet hop per statement and four round trips (BEGIN, the settings
statement, the SELECT, COMMIT); this path pays three on asyncpg directly:

1. one simple-query batch: ``BEGIN READ ONLY`` plus the same transaction-local settings
   :mod:`db.session` sets (tenant for row-level security, statement timeout, role);
2. the SELECT, as an asyncpg prepared statement (cached per connection, or unnamed when
   the statement cache is off for PgBouncer);
3. ``COMMIT``.

What stays the same: SQLAlchemy builds every statement (a Core select compiled once per
dialect, its bind and result processors applied, so rows carry the same Python types as
through a session); the connection comes from the engine's pool (pre-ping, pool-wait
timing); the statement is commented, traced, timed and digested by the engine's
:class:`~db.observability.EngineObserver`; errors leave as :mod:`db.errors` types; RLS
and the tenant filter in the select both apply. SQLite has no such shortcut to take and
runs the same select in an ordinary transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Select

from db.error_translation import translate_error
from db.observability import observer_of
from db.tenancy import Tenant

if TYPE_CHECKING:
    from db.engine import Database

Processor = Callable[[Any], Any] | None

# A role name is inlined into the settings batch (a simple query cannot take parameters);
# settings validate it against this as well, so it can never carry SQL.
ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    #: Values of binds the statement carries itself (``literal(...)``), by name.
    defaults: Mapping[str, Any]
    bind_processors: tuple[Processor, ...]
    result_processors: tuple[Processor, ...]


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
                compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
                for name in names
            )
            results = tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in self.statement.selected_columns
            )
            defaults = {
                name: compiled.binds[name].value
                for name in names
                if compiled.binds[name].value is not None
            }
            found = _Compiled(str(compiled), names, defaults, binds, results)
            self._compiled[dialect.name] = found
        return found


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
        if not ROLE_NAME.match(role):
            raise ValueError(f"not a plain role name: {role!r}")
        settings.append(f"set_config('role', '{role}', true)")
    return "BEGIN READ ONLY; SELECT " + ", ".join(settings)


@dataclass(frozen=True, slots=True)
class PointReader:
    """Runs :class:`PointRead` selects for one tenant (see the module docstring)."""

    database: Database
    tenant: Tenant
    timeout_ms: int | None
    engine: AsyncEngine

    async def fetch_row(self, read: PointRead, params: Mapping[str, Any]) -> Sequence[Any] | None:
        """The row, with the columns' Python types, or None."""
        if self.engine.dialect.name != "postgresql":
            return await self._fetch_in_session(read, params)
        compiled = read.compiled(self.engine.dialect)
        args = [
            value if process is None else process(value)
            for value, process in zip(
                (
                    params[name] if name in params else compiled.defaults[name]
                    for name in compiled.names
                ),
                compiled.bind_processors,
                strict=True,
            )
        ]
        record = await self._fetch_on_driver(compiled.sql, args)
        if record is None:
            return None
        return tuple(
            value if process is None or value is None else process(value)
            for value, process in zip(record, compiled.result_processors, strict=True)
        )

    async def _fetch_in_session(
        self, read: PointRead, params: Mapping[str, Any]
    ) -> Sequence[Any] | None:
        async with self.database.transaction(
            self.tenant, timeout_ms=self.timeout_ms, read_only=True, engine=self.engine
        ) as session:
            connection = await session.connection()
            row: Sequence[Any] | None = (
                await connection.execute(read.statement, dict(params))
            ).first()
            return row

    async def _fetch_on_driver(self, sql: str, args: list[Any]) -> Any:
        batch = _settings_batch(self.tenant, self.timeout_ms, self.database.config.app_role)
        observer = observer_of(self.engine)
        try:
            async with self.engine.connect() as connection:
                pooled = await connection.get_raw_connection()
                driver: Any = pooled.driver_connection
                try:
                    await driver.execute(batch)
                    if observer is None:
                        record = await driver.fetchrow(sql, *args)
                    else:
                        text, pending = observer.start(sql, args, connection.info)
                        try:
                            record = await driver.fetchrow(text, *args)
                        except BaseException as exc:
                            observer.finish(pending, -1, exc)
                            raise
                        observer.finish(pending, 0 if record is None else 1, None)
                    await driver.execute("COMMIT")
                except BaseException:
                    await asyncio.shield(_end_or_discard(connection, driver))
                    raise
                return record
        except Exception as exc:
            mapped = translate_error(exc)
            if mapped is not None and mapped is not exc:
                raise mapped from exc
            raise


async def _end_or_discard(connection: Any, driver: Any) -> None:
    """Roll back whatever is open; a connection that cannot is dropped from the pool, so
    no transaction (or half-read reply) ever reaches the next borrower."""
    try:
        if driver.is_in_transaction():
            await driver.execute("ROLLBACK")
    except Exception:
        with contextlib.suppress(Exception):
            await connection.invalidate()
