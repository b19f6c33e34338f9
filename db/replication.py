"""Write-ahead-log positions (LSNs) of a PostgreSQL primary and its streaming replicas.

The server's read router (``server/read_routing.py``) compares them to send a caller's
reads to a replica only once that replica has replayed the caller's writes.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

_PRIMARY_LSN = text("SELECT pg_current_wal_insert_lsn()::text")
# A "replica" that is not in recovery (a promoted one) is as current as it gets.
_REPLAYED_LSN = text(
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_insert_lsn() END)::text"
)


def parse_lsn(value: str) -> int:
    """``'16/B374D848'`` -> a comparable integer."""
    high, _, low = value.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


async def primary_position(engine: AsyncEngine) -> int:
    """The primary's current WAL insert position: at or past every commit it has answered."""
    async with engine.connect() as conn:
        return parse_lsn((await conn.execute(_PRIMARY_LSN)).scalar_one())


async def replayed_position(engine: AsyncEngine) -> int | None:
    """How far a replica has replayed the primary's WAL; None when it cannot say."""
    async with engine.connect() as conn:
        value = (await conn.execute(_REPLAYED_LSN)).scalar_one_or_none()
    return None if value is None else parse_lsn(value)
