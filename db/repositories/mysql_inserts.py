"""Multi-row inserts that skip rows colliding with a unique key, on MySQL and MariaDB.

PostgreSQL and SQLite say ``ON CONFLICT DO NOTHING``; the MySQL family's nearest is
``INSERT IGNORE``, which skips duplicate-key rows but also downgrades every other error
(a too-long string, a bad date) to a warning and writes a clipped value. So each insert
is followed by a look at the warning count: exactly one warning per skipped row is the
duplicates; anything more is bad data, raised as a validation error, and the caller's
transaction rolls back (nothing clipped is ever committed). CHECK and foreign-key
failures stay errors even under IGNORE on MariaDB.

MariaDB returns the ids written (``INSERT ... RETURNING``); MySQL has no RETURNING, so
there the rows whose key is already taken are looked up first, and an insert that then
writes fewer rows than expected (a concurrent writer took a key in between) is a
conflict the caller retries.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from db.errors import ConcurrentModificationError, FieldViolation, ValidationError

_WARNING_COUNT = text("SELECT @@warning_count")


async def insert_skipping_duplicates(
    session: AsyncSession, table: Table, rows: Sequence[dict[str, Any]], key: Column[Any]
) -> set[uuid.UUID]:
    """Insert ``rows`` in one statement, skipping those that collide with any unique key;
    returns the ``key`` values (ids) of the rows written."""
    if not rows:
        return set()
    if session.get_bind().dialect.insert_returning:
        stmt = insert(table).prefix_with("IGNORE").values(list(rows)).returning(key)
        written = set((await session.execute(stmt)).scalars())
        await _require_only_duplicates(session, skipped=len(rows) - len(written))
        return written
    wanted = [row[key.name] for row in rows]
    taken = set((await session.execute(select(key).where(key.in_(wanted)))).scalars())
    fresh = [row for row in rows if row[key.name] not in taken]
    if not fresh:
        return set()
    result = await session.execute(insert(table).prefix_with("IGNORE").values(fresh))
    written_count = int(getattr(result, "rowcount", 0) or 0)
    await _require_only_duplicates(session, skipped=len(fresh) - written_count)
    if written_count != len(fresh):
        raise ConcurrentModificationError("a concurrent writer inserted the same rows; retry")
    return {row[key.name] for row in fresh}


async def _require_only_duplicates(session: AsyncSession, *, skipped: int) -> None:
    warnings = int((await session.execute(_WARNING_COUNT)).scalar_one())
    require_only_duplicates(warnings=warnings, skipped=skipped)


def require_only_duplicates(*, warnings: int, skipped: int) -> None:
    """After an INSERT IGNORE that skipped ``skipped`` rows: any warning beyond one per
    skipped row was a value MySQL clipped or replaced, refused here (the caller's
    transaction then rolls back)."""
    if warnings > skipped:
        raise ValidationError(
            [FieldViolation("rows", "a value does not fit its column (too long or malformed)")]
        )
