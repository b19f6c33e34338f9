"""Exactly-once bulk insert of streamed prediction batches (StreamPredictions' write path).

One call writes a *group* of batches in the caller's transaction and returns, per batch,
how many rows were new and how many already existed. Exactly-once rests on two keys:

* ``ingest_batches (organization_id, batch_id)``: a batch recorded there was committed
  before, so a re-send writes nothing (its rows count as duplicates);
* ``predictions.id``: ``ON CONFLICT (id) DO NOTHING`` skips rows that exist (client ids
  re-used, a concurrent stream sending the same batch), first write wins.

PostgreSQL path (measured fastest that stays exactly-once, see ``bench/ingest.py``):
binary COPY of the rows into a per-connection temporary staging table, then one
statement that moves them with ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, counts
the inserted rows per batch and records the batches. COPY straight into ``predictions``
is not an option: it cannot skip conflicts, and PostgreSQL refuses COPY FROM into a
table under row-level security (the application role is). A temporary table has no
RLS; the INSERT ... SELECT goes through the policies like any insert. The staging
table lives per connection (``ON COMMIT DELETE ROWS``): no catalog churn per group,
and ``IF NOT EXISTS`` re-creates it on a fresh backend (PgBouncer transaction mode).

MySQL/MariaDB: the batch ids are looked up, then the rows go in multi-row ``INSERT
IGNORE ... RETURNING id`` statements of 1000 rows sent on asyncmy directly (duplicates
skipped, any other data problem still an error: see :mod:`db.repositories.mysql_inserts`),
so a row a concurrent stream committed first is skipped rather than failing the group;
recording the batch id is a plain INSERT, so two transactions writing the same batch
cannot both commit it (the second fails, rolls back, and its client re-sends).

SQLite (the embedded default) takes a portable path: look the keys up, insert the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import asyncmy.errors
import asyncpg
from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from db.error_translation import translate_error
from db.errors import (
    AccessDeniedError,
    ConcurrentModificationError,
    DatabaseUnavailableError,
    StatementTimeoutError,
)
from db.models import IngestBatch, Prediction
from db.models.base import MYSQL_DIALECTS
from db.repositories.mysql_inserts import insert_skipping_duplicates, require_only_duplicates

__all__ = [
    "STAGED_COLUMNS",
    "BatchCounts",
    "PendingBatch",
    "StagedRow",
    "ingest_batches",
]

#: A validated row in staging order (see STAGED_COLUMNS); features is JSON text or None.
StagedRow = tuple[uuid.UUID, str, float, str, str, str, str | None, datetime, str]

#: Columns of a StagedRow; organization_id and create_by are the same for a whole group.
STAGED_COLUMNS: tuple[str, ...] = (
    "id",
    "subject_id",
    "probability",
    "risk_level",
    "model_name",
    "model_version",
    "features",
    "predict_time",
    "request_id",
)

_CREATE_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS {table} (
    id uuid NOT NULL,
    subject_id text NOT NULL,
    probability double precision NOT NULL,
    risk_level text NOT NULL,
    model_name text NOT NULL,
    model_version text NOT NULL,
    features jsonb,
    predict_time timestamptz NOT NULL,
    request_id text NOT NULL
) ON COMMIT DELETE ROWS
"""

# The role matters: a temporary table belongs to the role that created it, and the
# transaction may run as the application role or (tests, tools) as the login role.
_EXISTING_BATCHES = """
SELECT current_user, ARRAY(
    SELECT batch_id FROM ingest_batches
    WHERE organization_id = $1 AND batch_id = ANY($2::text[])
)
"""

# One round trip moves the staged rows, counts the new ones per batch and records the
# batches. Data-modifying CTEs share one snapshot, so the counts come from RETURNING.
_MOVE_STAGED = """
WITH inserted AS (
    INSERT INTO predictions (
        id, organization_id, subject_id, probability, risk_level, model_name,
        model_version, features, predict_time, request_id, create_by
    )
    SELECT s.id, $1, s.subject_id, s.probability, s.risk_level, s.model_name,
           s.model_version, s.features, s.predict_time, s.request_id, $2
    FROM {table} AS s
    ON CONFLICT (id) DO NOTHING
    RETURNING request_id
), counts AS (
    SELECT request_id, count(*)::int AS n FROM inserted GROUP BY request_id
), recorded AS (
    INSERT INTO ingest_batches (organization_id, batch_id, accepted, duplicates, rejected)
    SELECT $1, b.batch_id, coalesce(c.n, 0), b.valid - coalesce(c.n, 0), b.rejected
    FROM unnest($3::text[], $4::int[], $5::int[]) AS b(batch_id, valid, rejected)
    LEFT JOIN counts AS c ON c.request_id = b.batch_id
    ON CONFLICT (organization_id, batch_id) DO NOTHING
)
SELECT request_id, n FROM counts
"""


@dataclass(slots=True)
class PendingBatch:
    """One streamed batch after validation, ready to write."""

    batch_id: str
    #: Valid rows whose id is new within the group (the stream drops later repeats).
    rows: list[StagedRow] = field(default_factory=list)
    #: Valid rows in the batch, including repeats of an id earlier in the group.
    valid: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class BatchCounts:
    accepted: int
    duplicates: int


async def ingest_batches(
    session: AsyncSession,
    organization_id: uuid.UUID,
    create_by: str | None,
    batches: Sequence[PendingBatch],
) -> list[BatchCounts]:
    """Write ``batches`` (distinct batch ids) in the session's transaction.

    Batches already recorded in ``ingest_batches`` write nothing; rows whose id exists
    are skipped. Batches with no valid row are not recorded (a re-send is harmless).
    Returns accepted/duplicate counts per batch, in order; ``accepted + duplicates ==
    valid`` for each.
    """
    writable = [b for b in batches if b.valid > 0]
    if not writable:
        return [BatchCounts(0, 0) for _ in batches]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        accepted = await _ingest_postgres(session, organization_id, create_by, writable)
    elif dialect in MYSQL_DIALECTS:
        accepted = await _ingest_mysql(session, organization_id, create_by, writable)
    else:
        accepted = await _ingest_portable(session, organization_id, create_by, writable)
    return [
        BatchCounts(accepted.get(b.batch_id, 0), b.valid - accepted.get(b.batch_id, 0))
        for b in batches
    ]


async def _raw_connection(session: AsyncSession) -> asyncpg.Connection[Any]:
    """The asyncpg connection inside the session's transaction (tenant settings apply)."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: asyncpg.Connection[Any] = raw.driver_connection
    return driver


async def _ingest_postgres(
    session: AsyncSession,
    organization_id: uuid.UUID,
    create_by: str | None,
    batches: Sequence[PendingBatch],
) -> dict[str, int]:
    conn = await _raw_connection(session)
    try:
        role, existing = await conn.fetchrow(
            _EXISTING_BATCHES, organization_id, [b.batch_id for b in batches]
        )
        fresh = [b for b in batches if b.batch_id not in set(existing)]
        records = [row for b in fresh for row in b.rows]
        if not fresh:
            return {}
        table = _staging_table(role)
        await conn.execute(_CREATE_STAGING.format(table=table))
        if records:
            await conn.copy_records_to_table(table, records=records, columns=STAGED_COLUMNS)
        rows = await conn.fetch(
            _MOVE_STAGED.format(table=table),
            organization_id,
            create_by,
            [b.batch_id for b in fresh],
            [b.valid for b in fresh],
            [b.rejected for b in fresh],
        )
    except asyncpg.PostgresError as exc:
        raise _translate(exc) from exc
    except (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
        # A connection killed mid-COPY can leave asyncpg's protocol stuck in the copy state
        # (InternalClientError on the next call): never hand that connection back to the pool.
        with contextlib.suppress(Exception):
            await (await session.connection()).invalidate(exc)
        raise DatabaseUnavailableError("the database connection failed") from exc
    return {r[0]: r[1] for r in rows}


def _staging_table(role: str) -> str:
    safe = "".join(c for c in role.lower() if c.isalnum() or c == "_")[:40]
    suffix = safe if safe == role else hashlib.sha1(role.encode()).hexdigest()[:12]
    return f"ferrule_ingest_staging_{suffix}"


def _translate(exc: asyncpg.PostgresError) -> Exception:
    """Errors of the raw asyncpg calls (SQLAlchemy's translation does not see them)."""
    state = getattr(exc, "sqlstate", "") or ""
    if state == "57014":
        return StatementTimeoutError("the ingest ran past its deadline and was cancelled")
    if state in ("40001", "40P01"):
        return ConcurrentModificationError("a concurrent ingest conflicted; re-send the batches")
    if state.startswith("08") or state in ("57P01", "57P02", "57P03", "53300"):
        return DatabaseUnavailableError("the database connection failed")
    if state == "42501":
        return AccessDeniedError("the database refused the ingest")
    unknown: Exception = exc
    return unknown


async def _ingest_portable(
    session: AsyncSession,
    organization_id: uuid.UUID,
    create_by: str | None,
    batches: Sequence[PendingBatch],
) -> dict[str, int]:
    """Look-up-then-insert; right where writers are serialised (SQLite has one writer)."""
    fresh = await _unrecorded(session, organization_id, batches)
    table = cast(Table, Prediction.__table__)
    candidates = [row for b in fresh for row in b.rows]
    taken: set[uuid.UUID] = set()
    for start in range(0, len(candidates), 500):
        chunk = [row[0] for row in candidates[start : start + 500]]
        found = await session.execute(select(table.c.id).where(table.c.id.in_(chunk)))
        taken.update(found.scalars())
    accepted: dict[str, int] = {}
    values: list[dict[str, Any]] = []
    for row in candidates:
        if row[0] in taken:
            continue
        accepted[row[8]] = accepted.get(row[8], 0) + 1
        values.append(_prediction_values(row, organization_id, create_by))
    if values:
        await session.execute(insert(table), values)
    await _record_batches(session, organization_id, fresh, accepted)
    return accepted


async def _ingest_mysql(
    session: AsyncSession,
    organization_id: uuid.UUID,
    create_by: str | None,
    batches: Sequence[PendingBatch],
) -> dict[str, int]:
    fresh = await _unrecorded(session, organization_id, batches)
    records = [row for b in fresh for row in b.rows]
    if session.get_bind().dialect.insert_returning:
        written = await _insert_staged_mariadb(session, organization_id, create_by, records)
    else:  # MySQL: no RETURNING; the portable helper looks the ids up first
        table = cast(Table, Prediction.__table__)
        written = set()
        for start in range(0, len(records), MYSQL_INSERT_ROWS):
            chunk = [
                _prediction_values(row, organization_id, create_by)
                for row in records[start : start + MYSQL_INSERT_ROWS]
            ]
            written |= await insert_skipping_duplicates(session, table, chunk, table.c.id)
    accepted: dict[str, int] = {}
    for row in records:
        if row[0] in written:
            written.discard(row[0])  # a repeated id counts once, for its first batch
            accepted[row[8]] = accepted.get(row[8], 0) + 1
    await _record_batches(session, organization_id, fresh, accepted)
    return accepted


_MARIADB_INSERT = (
    "INSERT IGNORE INTO predictions (id, organization_id, subject_id, probability,"
    " risk_level, model_name, model_version, features, predict_time, request_id, create_by)"
    " VALUES "
)
_MARIADB_ROW = "(" + ", ".join(["%s"] * 11) + ")"


async def _insert_staged_mariadb(
    session: AsyncSession,
    organization_id: uuid.UUID,
    create_by: str | None,
    records: Sequence[StagedRow],
) -> set[uuid.UUID]:
    """The hot path on MariaDB: multi-row INSERT IGNORE ... RETURNING on asyncmy directly
    (the rows are validated and already in the column types: no per-value bind processing
    or statement compilation), duplicates checked as in :mod:`db.repositories.mysql_inserts`.
    Returns the ids written."""
    connection = await session.connection()
    driver: Any = (await connection.get_raw_connection()).driver_connection
    organization = str(organization_id)
    written: set[uuid.UUID] = set()
    try:
        async with driver.cursor() as cursor:
            for start in range(0, len(records), MYSQL_INSERT_ROWS):
                chunk = records[start : start + MYSQL_INSERT_ROWS]
                params: list[Any] = []
                for r in chunk:
                    when = r[7].astimezone(UTC).replace(tzinfo=None)
                    params += (str(r[0]), organization, *r[1:7], when, r[8], create_by)
                sql = _MARIADB_INSERT + ", ".join([_MARIADB_ROW] * len(chunk)) + " RETURNING id"
                await cursor.execute(sql, params)
                ids = {uuid.UUID(str(found)) for (found,) in await cursor.fetchall()}
                await cursor.execute("SELECT @@warning_count")
                (warnings,) = await cursor.fetchone()
                require_only_duplicates(warnings=int(warnings), skipped=len(chunk) - len(ids))
                written |= ids
    except asyncmy.errors.Error as exc:
        mapped = translate_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
    return written


#: Rows per multi-row INSERT on MySQL/MariaDB: statements stay far below max_allowed_packet.
MYSQL_INSERT_ROWS = 1000


async def _unrecorded(
    session: AsyncSession, organization_id: uuid.UUID, batches: Sequence[PendingBatch]
) -> list[PendingBatch]:
    """The batches whose id no committed transaction recorded."""
    batch_table = cast(Table, IngestBatch.__table__)
    existing = set(
        (
            await session.execute(
                select(batch_table.c.batch_id).where(
                    batch_table.c.organization_id == organization_id,
                    batch_table.c.batch_id.in_([b.batch_id for b in batches]),
                )
            )
        ).scalars()
    )
    return [b for b in batches if b.batch_id not in existing]


def _prediction_values(
    row: StagedRow, organization_id: uuid.UUID, create_by: str | None
) -> dict[str, Any]:
    return {
        "id": row[0],
        "organization_id": organization_id,
        "subject_id": row[1],
        "probability": row[2],
        "risk_level": row[3],
        "model_name": row[4],
        "model_version": row[5],
        "features": None if row[6] is None else json.loads(row[6]),
        "predict_time": row[7],
        "request_id": row[8],
        "create_by": create_by,
    }


async def _record_batches(
    session: AsyncSession,
    organization_id: uuid.UUID,
    fresh: Sequence[PendingBatch],
    accepted: dict[str, int],
) -> None:
    if not fresh:
        return
    await session.execute(
        insert(cast(Table, IngestBatch.__table__)),
        [
            {
                "organization_id": organization_id,
                "batch_id": b.batch_id,
                "accepted": accepted.get(b.batch_id, 0),
                "duplicates": b.valid - accepted.get(b.batch_id, 0),
                "rejected": b.rejected,
            }
            for b in fresh
        ],
    )
