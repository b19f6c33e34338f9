"""Engines and the :class:`Database` handle the server holds for its lifetime.

One async engine for the primary and one per read replica. PostgreSQL goes through
asyncpg (prepared statements can be switched off for PgBouncer in transaction mode);
MySQL/MariaDB through asyncmy, every connection in UTC, strict SQL mode and READ
COMMITTED (as on PostgreSQL, a statement sees what committed before it); SQLite through
aiosqlite with foreign keys on, WAL and a busy timeout on every connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, StaticPool

from db.engine_factory import async_engine
from db.models.base import MYSQL_DIALECTS
from db.point_read_pool import PointReadPool
from db.point_reads import ROLE_NAME, PointReader
from db.session import (
    DEFAULT_CLEANUP_TIMEOUT,
    open_transaction,
    reset_statement_timeout_on_return,
)
from db.tenancy import Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str
    replica_urls: tuple[str, ...] = ()
    pool_size: int = 10
    max_overflow: int = 10
    #: Seconds to wait for a free pooled connection before DatabaseUnavailableError.
    pool_timeout: float = 5.0
    #: Seconds after which a pooled connection is replaced.
    pool_recycle: float = 1800.0
    pool_pre_ping: bool = True
    #: Only connections idle in the pool at least this long are pinged before use.
    pool_ping_idle_seconds: float = 2.0
    #: asyncpg prepared-statement cache; 0 for PgBouncer in transaction mode.
    statement_cache_size: int = 100
    #: PostgreSQL role each transaction switches to (``ferrule_app``: no BYPASSRLS, not owner).
    app_role: str | None = None
    #: Connections kept for point reads (:mod:`db.point_reads`); 0 turns that pool off.
    #: Never used behind PgBouncer (``statement_cache_size`` 0), which cannot keep the
    #: session state those connections carry.
    point_read_pool_size: int = 4
    #: statement_timeout for transactions that do not pass one (None: no limit).
    default_statement_timeout_ms: int | None = None
    sqlite_busy_timeout_ms: int = 5000
    echo: bool = False

    def __post_init__(self) -> None:
        # Point reads inline the role into a simple query (no parameters there).
        if self.app_role is not None and not ROLE_NAME.match(self.app_role):
            raise ValueError(f"app_role must be a plain role name, not {self.app_role!r}")


@dataclass(frozen=True, slots=True)
class PingResult:
    latency_seconds: float
    server_version: str


@dataclass(frozen=True, slots=True)
class PoolStatus:
    size: int
    checked_out: int
    overflow: int


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        finally:
            cursor.close()

    return on_connect


def create_engine(url: str, config: DatabaseConfig) -> AsyncEngine:
    """An async engine for ``url`` with the pool and driver settings of ``config``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        in_memory = parsed.database in (None, "", ":memory:")
        engine = async_engine(
            url,
            echo=config.echo,
            # One shared connection keeps an in-memory database alive across sessions.
            poolclass=StaticPool if in_memory else None,
            **({} if in_memory else {"pool_size": config.pool_size, "pool_timeout": 30}),
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(config.sqlite_busy_timeout_ms))
        return engine
    if parsed.get_backend_name() in MYSQL_DIALECTS:
        return _create_mysql_engine(url, config)
    connect_args: dict[str, Any]
    if config.statement_cache_size == 0:
        # PgBouncer (transaction mode) may hand each statement to another backend: no
        # named prepared statements may outlive a statement, nor share names across clients.
        connect_args = {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__ferrule_{uuid.uuid4().hex}__",
        }
    else:
        connect_args = {"prepared_statement_cache_size": config.statement_cache_size}
    return _pooled_engine(url, config, connect_args=connect_args)


#: Run by asyncmy on every new connection: DATETIME values are UTC, and bad data is an
#: error instead of a warning with a silently clipped value.
MYSQL_INIT_COMMAND = (
    "SET time_zone = '+00:00', sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,"
    "NO_ZERO_DATE,NO_ZERO_IN_DATE,NO_ENGINE_SUBSTITUTION'"
)


def _create_mysql_engine(url: str, config: DatabaseConfig) -> AsyncEngine:
    engine = _pooled_engine(
        url,
        config,
        isolation_level="READ COMMITTED",
        connect_args={"init_command": MYSQL_INIT_COMMAND, "charset": "utf8mb4"},
    )
    reset_statement_timeout_on_return(engine)
    return engine


def create_point_read_pool(url: str, config: DatabaseConfig) -> PointReadPool | None:
    """The pool that only point reads use (see :mod:`db.point_reads`), or None where
    it cannot be used: SQLite, PgBouncer in transaction mode, or switched off.

    Its connections are read-only for their whole session (``default_transaction_read_only``),
    so whatever runs on them can never write. SQLAlchemy makes them (a pool-less engine:
    the dialect's codecs, TLS and server settings); :mod:`db.point_read_pool` lends them."""
    if (
        make_url(url).get_backend_name() != "postgresql"
        or config.statement_cache_size == 0
        or config.point_read_pool_size <= 0
    ):
        return None
    server_settings = {"default_transaction_read_only": "on"}
    if config.default_statement_timeout_ms:
        server_settings["statement_timeout"] = str(config.default_statement_timeout_ms)
    engine = async_engine(
        url,
        echo=config.echo,
        poolclass=NullPool,
        connect_args={
            "prepared_statement_cache_size": config.statement_cache_size,
            "server_settings": server_settings,
        },
    )
    return PointReadPool(
        engine,
        size=config.point_read_pool_size,
        timeout=config.pool_timeout,
        recycle_seconds=config.pool_recycle,
        ping_idle_seconds=config.pool_ping_idle_seconds if config.pool_pre_ping else None,
    )


def _pooled_engine(
    url: str,
    config: DatabaseConfig,
    *,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    **driver_options: Any,
) -> AsyncEngine:
    """A server database's engine: ``config``'s pool (its size unless given) and idle pings."""
    engine = async_engine(
        url,
        echo=config.echo,
        pool_size=config.pool_size if pool_size is None else pool_size,
        max_overflow=config.max_overflow if max_overflow is None else max_overflow,
        pool_timeout=config.pool_timeout,
        pool_recycle=config.pool_recycle,
        **driver_options,
    )
    if config.pool_pre_ping:
        _ping_idle_connections(engine, config.pool_ping_idle_seconds)
    return engine


def _ping_idle_connections(engine: AsyncEngine, idle_seconds: float) -> None:
    """Pre-ping, but only connections that sat idle in the pool for ``idle_seconds``.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout, and the asyncpg ping is three
    round trips (BEGIN, empty statement, ROLLBACK): on a busy pool that nearly doubles a
    point read. A connection returned moments ago is as alive as a ping could prove;
    one that idled (through a database restart, say) is pinged, and a dead one is
    replaced transparently (DisconnectionError makes the pool retry with a fresh one).
    """
    pool = engine.sync_engine.pool

    def on_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["ferrule.checkin"] = time.monotonic()

    def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        returned = record.info.get("ferrule.checkin")
        if returned is not None and time.monotonic() - returned < idle_seconds:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:
            raise sa_exc.DisconnectionError("pooled connection failed its ping") from exc

    event.listen(pool, "checkin", on_checkin)
    event.listen(pool, "checkout", on_checkout)


class Database:
    """The data layer's entry point: engines, pools and tenant-scoped transactions."""

    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        self.engine = create_engine(config.url, config)
        self.replica_engines = tuple(create_engine(url, config) for url in config.replica_urls)
        self.point_read_pool = create_point_read_pool(config.url, config)
        self._replicas = itertools.cycle(self.replica_engines) if self.replica_engines else None
        self._sessions = async_sessionmaker(expire_on_commit=False, class_=AsyncSession)
        #: How long a rollback or close may wait on the server before its connection is
        #: dropped (the server sets its grace period, and shortens it when stopping).
        self.cleanup_timeout = DEFAULT_CLEANUP_TIMEOUT

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Database:
        return cls(DatabaseConfig(url=url, **options))

    @property
    def engines(self) -> tuple[AsyncEngine, ...]:
        """Every engine (primary first, replicas, the point-read pool's), for observers."""
        extra = (self.point_read_pool.engine,) if self.point_read_pool is not None else ()
        return (self.engine, *self.replica_engines, *extra)

    @property
    def dialect_name(self) -> str:
        """``"postgresql"``, ``"mariadb"``, ``"mysql"`` or ``"sqlite"``."""
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(
        self,
        tenant: Tenant,
        *,
        timeout_ms: int | None = None,
        read_only: bool = False,
        engine: AsyncEngine | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """A session in one transaction acting for ``tenant``; commits on success.

        On PostgreSQL a single statement at the start sets the tenant for row-level
        security, the statement timeout (the RPC's remaining deadline), the application
        role and read-only mode, all transaction-local (safe behind PgBouncer).
        ``read_only`` transactions go to a replica when one is configured, unless
        ``engine`` names one (the server's read router, which keeps read-your-writes).
        Driver errors leave as :mod:`db.errors` types; cancellation rolls back and
        propagates.
        """
        if engine is None:
            engine = self.engine
            if read_only and self._replicas is not None:
                engine = next(self._replicas)
        if timeout_ms is None:
            timeout_ms = self.config.default_statement_timeout_ms
        async with open_transaction(
            self._sessions(bind=engine),
            tenant,
            timeout_ms=timeout_ms,
            read_only=read_only,
            app_role=self.config.app_role,
            cleanup_timeout=self.cleanup_timeout,
        ) as session:
            yield session

    def point_reader(
        self,
        tenant: Tenant,
        *,
        timeout_ms: int | None = None,
        engine: AsyncEngine | None = None,
    ) -> PointReader:
        """Single-row reads for ``tenant`` outside a session (:mod:`db.point_reads`), on
        ``engine`` (default: the primary, so cache loaders never store a replica's lag)."""
        if timeout_ms is None:
            timeout_ms = self.config.default_statement_timeout_ms
        engine = engine or self.engine
        return PointReader(
            tenant,
            timeout_ms,
            engine,
            point_read_pool=self.point_read_pool if engine is self.engine else None,
            app_role=self.config.app_role,
        )

    async def ping(self) -> PingResult:
        """Round-trip latency and server version; raises a db error when unreachable."""
        query = "SELECT sqlite_version()" if self.dialect_name == "sqlite" else "SELECT version()"
        started = time.perf_counter()
        async with open_transaction(
            self._sessions(bind=self.engine),
            Tenant(None),
            timeout_ms=None,
            read_only=True,
            cleanup_timeout=self.cleanup_timeout,
        ) as session:
            version = (await session.execute(text(query))).scalar_one()
        return PingResult(time.perf_counter() - started, str(version))

    def pool_statuses(self) -> list[tuple[str, PoolStatus]]:
        """Each pool by name, for the pool gauges: ``primary``, then ``point_reads`` when
        that pool exists (its saturation shows as cache misses waiting)."""
        statuses = [("primary", self.pool_status())]
        if self.point_read_pool is not None:
            pool = self.point_read_pool
            statuses.append(("point_reads", PoolStatus(pool.size, pool.checked_out, 0)))
        return statuses

    def pool_status(self) -> PoolStatus:
        pool: Any = self.engine.pool
        size = pool.size() if hasattr(pool, "size") else 1
        checked_out = pool.checkedout() if hasattr(pool, "checkedout") else 0
        overflow = max(pool.overflow(), 0) if hasattr(pool, "overflow") else 0
        return PoolStatus(size=size, checked_out=checked_out, overflow=overflow)

    async def dispose(self) -> None:
        """Close the pools' idle connections, waiting at most ``cleanup_timeout`` per
        engine: closing says goodbye to the server, and a stalled one never answers."""
        if self.point_read_pool is not None:
            await self.point_read_pool.close(self.cleanup_timeout)
        for engine in self.engines:
            try:
                async with asyncio.timeout(self.cleanup_timeout):
                    await engine.dispose()
            except TimeoutError:
                log.warning(
                    "closing %s's pooled connections still waiting after %.1f s: abandoned",
                    engine.dialect.name,
                    self.cleanup_timeout,
                )
                await engine.dispose(close=False)
