"""Migrated template databases, built once and cloned for every test that needs a schema.

Running every migration for every test dominated the suite's time. Instead, a session
builds the schema once per backend and each test gets a private copy:

* **PostgreSQL**: ``CREATE DATABASE <test> TEMPLATE ferrule_template_<fingerprint>``.
  The fingerprint hashes the migration scripts, so a changed migration builds a new
  template, and engineers on other branches sharing the server keep their own. Several
  pytest runs may start at once against one server: the builder holds a PostgreSQL
  advisory lock named after the fingerprint, migrates a database with a temporary name
  and renames it into place only when it is complete, so a template that exists under
  its final name is always whole. The template refuses connections (``ALLOW_CONNECTIONS
  false``): nothing can change it, and nothing connected to it can make a clone fail.
  Each session records its use in the template's comment; templates of other
  fingerprints unused for :data:`STALE_AFTER` are dropped, with their abandoned builds.
* **SQLite**: one migrated file per session, copied per test.

* **MariaDB** has no ``CREATE DATABASE ... TEMPLATE`` and no ``RENAME DATABASE``: the
  template is built under a named lock (``GET_LOCK``) and marked complete by a table
  created last; a copy re-creates each table from ``SHOW CREATE TABLE`` (columns,
  indexes, checks and foreign keys alike) and each trigger from ``SHOW CREATE TRIGGER``,
  and copies the rows migrations wrote (``alembic_version``). Stale templates are swept
  as on PostgreSQL.

On both servers the per-test copies are made ahead of demand and dropped behind it, in
the background (:class:`ClonedDatabases`).

The migration tests do not use any of this: they start from empty databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncmy
import asyncpg
from sqlalchemy.engine import make_url

from db.migrate import MIGRATIONS_DIR, upgrade_to_head

TEMPLATE_PREFIX = "ferrule_template_"
_BUILD_PREFIX = "ferrule_template_build_"
#: A template of another fingerprint not used by any session for this long is dropped.
STALE_AFTER = 24 * 3600.0


def migrations_fingerprint(directory: Path = MIGRATIONS_DIR) -> str:
    """A digest of every migration script (path and content): what the schema is built from."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def template_name(fingerprint: str) -> str:
    return f"{TEMPLATE_PREFIX}{fingerprint}"


def _lock_key(fingerprint: str) -> int:
    """A signed 64-bit advisory lock key derived from the fingerprint."""
    return int.from_bytes(bytes.fromhex(fingerprint)[:8], "big", signed=True)


def _driverless(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _database_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))


async def _drop(conn: asyncpg.Connection, name: str) -> None:
    # A template cannot be dropped until it is marked as an ordinary database again.
    await conn.execute(f'ALTER DATABASE "{name}" IS_TEMPLATE false')
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def ensure_pg_template(admin_url: str) -> str:
    """The name of the migrated template for the current migrations (built if missing).

    Readers hold the fingerprint's advisory lock shared while they look and record their
    use; builders and the stale-template sweep hold it exclusively."""
    fingerprint = migrations_fingerprint()
    name = template_name(fingerprint)
    key = _lock_key(fingerprint)
    conn = await asyncpg.connect(_driverless(admin_url))
    try:
        await conn.execute("SELECT pg_advisory_lock_shared($1)", key)
        try:
            found = await _database_exists(conn, name)
            if found:
                await _record_use(conn, name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock_shared($1)", key)
        if not found:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            try:
                # Another run may have finished it while this one waited for the lock.
                if not await _database_exists(conn, name):
                    await _build_pg_template(conn, admin_url, fingerprint, name)
                await _record_use(conn, name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
        await _drop_stale_templates(conn, keep=fingerprint)
    finally:
        await conn.close()
    return name


async def _record_use(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{time.time():.0f}'")


async def _build_pg_template(
    conn: asyncpg.Connection, admin_url: str, fingerprint: str, name: str
) -> None:
    """Migrate under a temporary name, then rename: the final name only ever means whole."""
    # The lock is held: any build of this fingerprint still present was abandoned.
    await _drop_abandoned_builds(conn, fingerprint)
    build = f"{_BUILD_PREFIX}{fingerprint}_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE DATABASE "{build}"')
    try:
        await upgrade_to_head(with_database(admin_url, build))
        await conn.execute(
            f'ALTER DATABASE "{build}" WITH ALLOW_CONNECTIONS false IS_TEMPLATE true'
        )
        await conn.execute(f'ALTER DATABASE "{build}" RENAME TO "{name}"')
    except BaseException:
        await _drop(conn, build)
        raise


async def _drop_abandoned_builds(conn: asyncpg.Connection, fingerprint: str) -> None:
    rows = await conn.fetch(
        "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
        f"{_BUILD_PREFIX}{fingerprint}_",
    )
    for row in rows:
        await _drop(conn, row["datname"])


async def _drop_stale_templates(conn: asyncpg.Connection, keep: str) -> None:
    """Drop templates of other fingerprints no session has used for :data:`STALE_AFTER`.

    Each is dropped only while holding its fingerprint's lock (without waiting for it), so
    a run building or about to build that template is never disturbed."""
    rows = await conn.fetch(
        "SELECT datname, shobj_description(oid, 'pg_database') AS used FROM pg_database"
        " WHERE starts_with(datname, $1) AND NOT starts_with(datname, $2)",
        TEMPLATE_PREFIX,
        _BUILD_PREFIX,
    )
    now = time.time()
    for row in rows:
        fingerprint = row["datname"].removeprefix(TEMPLATE_PREFIX)
        if fingerprint == keep or len(fingerprint) != len(keep):
            continue
        try:
            last_used = float(row["used"] or 0)
        except ValueError:
            last_used = 0.0
        if now - last_used < STALE_AFTER:
            continue
        key = _lock_key(fingerprint)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            try:
                await _drop(conn, row["datname"])
                await _drop_abandoned_builds(conn, fingerprint)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def clone_pg_database(admin_url: str, template: str | None) -> str:
    """A new database (a copy of ``template``, or empty when None); returns its name."""
    name = f"ferrule_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_driverless(admin_url))
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()
    return name


async def drop_pg_databases(admin_url: str, names: list[str]) -> None:
    conn = await asyncpg.connect(_driverless(admin_url))
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


#: ``(admin_url, template or None) -> name`` of a new database on that server.
Clone = Callable[[str, str | None], Awaitable[str]]
#: ``(admin_url, names)``: drop those databases, whoever is still connected to them.
Drop = Callable[[str, list[str]], Awaitable[None]]


class ClonedDatabases:
    """Per-test databases on one server (PostgreSQL or MariaDB), cloned from its template
    ahead of demand and dropped behind it.

    A clone and a drop each cost the server mostly waiting on its disk; done on the
    session's event loop in the background, they overlap with the tests instead of
    adding to them. At most ``ahead`` clones wait unused; every database handed out or
    left over is dropped by :meth:`aclose` at the latest."""

    def __init__(
        self, admin_url: str, template: str, clone: Clone, drop: Drop, ahead: int = 2
    ) -> None:
        self.admin_url = admin_url
        self.template = template
        self.ahead = ahead
        self._clone = clone
        self._drop = drop
        self._ready: deque[asyncio.Task[str]] = deque()
        self._drops: set[asyncio.Task[None]] = set()

    async def take(self, *, migrated: bool = True) -> str:
        """The name of a new database of this test's own: at head, or empty."""
        if not migrated:
            return await self._clone(self.admin_url, None)
        self._refill()
        name = await self._ready.popleft()
        self._refill()
        return name

    def release(self, names: list[str]) -> None:
        """Drop ``names`` in the background (the test is done with them)."""
        if names:
            task = asyncio.ensure_future(self._drop(self.admin_url, list(names)))
            self._drops.add(task)
            task.add_done_callback(self._drops.discard)

    def _refill(self) -> None:
        while len(self._ready) < self.ahead:
            self._ready.append(asyncio.ensure_future(self._clone(self.admin_url, self.template)))

    async def aclose(self) -> None:
        unused: list[str] = []
        while self._ready:
            with contextlib.suppress(Exception):  # a failed clone left nothing to drop
                unused.append(await self._ready.popleft())
        await self._drop(self.admin_url, unused)
        if self._drops:
            await asyncio.gather(*self._drops)


async def build_sqlite_template(path: Path) -> Path:
    """A migrated SQLite file at ``path`` (a self-contained file: no WAL beside it)."""
    await upgrade_to_head(f"sqlite+aiosqlite:///{path}")
    leftovers = [p for p in path.parent.glob(path.name + "-*")]
    if leftovers:
        raise RuntimeError(f"the SQLite template is not a single file: {leftovers}")
    return path


def clone_sqlite_database(template: Path, target: Path) -> str:
    """A copy of the migrated file at ``target``; returns its SQLAlchemy URL."""
    shutil.copyfile(template, target)
    return f"sqlite+aiosqlite:///{target}"


# --- MariaDB ------------------------------------------------------------------------------
#: Created last in a MariaDB template: its presence means the template is complete. Its
#: one row records the last session that used the template.
_MARIADB_COMPLETE = "_ferrule_template_complete"
_MARIADB_CHARSET = "CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"


async def mariadb_connect(url: str) -> asyncmy.Connection:
    """A plain asyncmy connection (no database selected) to the server at ``url``."""
    parsed = make_url(url)
    return await asyncmy.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        connect_timeout=5,
        autocommit=True,
    )


async def drop_mariadb_database(admin_url: str, name: str) -> None:
    """Drop ``name`` after killing the sessions still using it (as PostgreSQL's FORCE)."""
    conn = await mariadb_connect(admin_url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT id FROM information_schema.processlist WHERE db = %s", (name,)
            )
            for (session_id,) in await cursor.fetchall():
                with contextlib.suppress(asyncmy.errors.Error):
                    await cursor.execute(f"KILL {int(session_id)}")
            await cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


async def drop_mariadb_databases(admin_url: str, names: list[str]) -> None:
    for name in names:
        await drop_mariadb_database(admin_url, name)


async def _mariadb_template_complete(cursor: Any, name: str) -> bool:
    await cursor.execute(
        "SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = %s",
        (name, _MARIADB_COMPLETE),
    )
    return bool(await cursor.fetchall())


async def ensure_mariadb_template(admin_url: str) -> str:
    """The name of the migrated MariaDB template for the current migrations (built if
    missing), under a named lock that every run takes to look, build or sweep."""
    fingerprint = migrations_fingerprint()
    name = template_name(fingerprint)
    conn = await mariadb_connect(admin_url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute("SELECT GET_LOCK(%s, 600)", (name,))
            try:
                if not await _mariadb_template_complete(cursor, name):
                    # A database under this name without the marker is an abandoned build.
                    await cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
                    await cursor.execute(f"CREATE DATABASE `{name}` {_MARIADB_CHARSET}")
                    await upgrade_to_head(with_database(admin_url, name))
                    await cursor.execute(
                        f"CREATE TABLE `{name}`.`{_MARIADB_COMPLETE}` (used DOUBLE NOT NULL)"
                    )
                await cursor.execute(f"DELETE FROM `{name}`.`{_MARIADB_COMPLETE}`")
                await cursor.execute(
                    f"INSERT INTO `{name}`.`{_MARIADB_COMPLETE}` VALUES (%s)", (time.time(),)
                )
            finally:
                await cursor.execute("SELECT RELEASE_LOCK(%s)", (name,))
            await _drop_stale_mariadb_templates(cursor, keep=name)
    finally:
        conn.close()
    return name


async def _drop_stale_mariadb_templates(cursor: Any, keep: str) -> None:
    await cursor.execute(
        "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
        (TEMPLATE_PREFIX.replace("_", "\\_") + "%",),
    )
    for (other,) in await cursor.fetchall():
        if other == keep or len(other) != len(keep):
            continue
        await cursor.execute("SELECT GET_LOCK(%s, 0)", (other,))
        (locked,) = await cursor.fetchone()
        if not locked:
            continue  # another run is looking at it or building it
        try:
            last_used = 0.0
            if await _mariadb_template_complete(cursor, other):
                await cursor.execute(f"SELECT MAX(used) FROM `{other}`.`{_MARIADB_COMPLETE}`")
                (value,) = await cursor.fetchone()
                last_used = float(value or 0)
            if time.time() - last_used >= STALE_AFTER:
                await cursor.execute(f"DROP DATABASE IF EXISTS `{other}`")
        finally:
            await cursor.execute("SELECT RELEASE_LOCK(%s)", (other,))


async def clone_mariadb_database(admin_url: str, template: str | None) -> str:
    """A new database (a copy of ``template``'s tables and rows, or empty when None);
    returns its name."""
    name = f"ferrule_test_{uuid.uuid4().hex[:12]}"
    conn = await mariadb_connect(admin_url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(f"CREATE DATABASE `{name}` {_MARIADB_CHARSET}")
            if template is not None:
                await _copy_mariadb_tables(cursor, template, name)
    finally:
        conn.close()
    return name


async def _copy_mariadb_tables(cursor: Any, template: str, target: str) -> None:
    await cursor.execute(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = %s AND table_type = 'BASE TABLE' AND table_name != %s",
        (template, _MARIADB_COMPLETE),
    )
    tables = [row[0] for row in await cursor.fetchall()]
    # Foreign keys name their tables unqualified: created in the target, they point there.
    await cursor.execute(f"USE `{target}`")
    await cursor.execute("SET SESSION foreign_key_checks = 0")
    for table in tables:
        await cursor.execute(f"SHOW CREATE TABLE `{template}`.`{table}`")
        (_, ddl) = await cursor.fetchone()
        await cursor.execute(ddl)
    for table in tables:
        await cursor.execute(
            f"INSERT INTO `{target}`.`{table}` SELECT * FROM `{template}`.`{table}`"
        )
    await cursor.execute(
        "SELECT trigger_name FROM information_schema.triggers WHERE trigger_schema = %s",
        (template,),
    )
    for (trigger,) in await cursor.fetchall():
        await cursor.execute(f"SHOW CREATE TRIGGER `{template}`.`{trigger}`")
        ddl = (await cursor.fetchone())[2]  # SQL Original Statement: unqualified table names
        await cursor.execute(ddl)
