"""The request log (seed 002 ``api_requests``): batched background inserts and a keyset list.

Entries are diagnostics written off the RPCs' critical path, so the writer is defensive:
an organization id that is malformed or names no organization (a call aimed at a
nonexistent tenant) is stored as NULL rather than failing the whole batch on the
foreign key.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Insert, Table, bindparam, delete, func, insert, select
from sqlalchemy import cast as cast_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import UserDefinedType

from db.engine import Database
from db.models import Organization, RequestLogEntry, new_id
from db.pagination import JSONValue, Page, SortKey, paginate, parse_order_by
from db.repositories.base import Repository, bounded
from db.tenancy import Tenant

ORDERABLE = {"create_time": RequestLogEntry.create_time}
DEFAULT_ORDER = (SortKey(RequestLogEntry.create_time, descending=True),)
#: Rows per statement: an executemany's 11 bind parameters a row stay well below
#: asyncpg's 32767, and PostgreSQL's arrays (which have no such limit) stay bounded.
INSERT_CHUNK_ROWS = 1000


class LoggedCall(NamedTuple):
    """One RPC's entry as the server hands it to the writer. A tuple in column order: the
    server makes one per call, and a batch turns into its columns with one ``zip``."""

    method: str
    caller: str | None
    organization_id: str | None
    peer: str
    user_agent: str | None
    status_code: str
    latency_ms: float
    request_bytes: int | None
    trace_id: str | None
    create_time: datetime


_COLUMNS = LoggedCall._fields
# Lengths of the bounded text columns: over-long values are cut, not refused.
_LIMITS = {
    name: getattr(RequestLogEntry.__table__.c[name].type, "length", None)
    for name in ("method", "caller", "peer", "user_agent", "status_code", "trace_id")
}
_TEXT_LIMITS = tuple((name, limit) for name, limit in _LIMITS.items() if limit is not None)


def _as_uuid(value: object) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and value:
        try:
            return uuid.UUID(value)
        except ValueError:
            return None
    return None


def _columns(entries: Sequence[LoggedCall]) -> dict[str, list[Any]]:
    """The batch column by column, ids drawn, long texts cut and organization ids parsed
    (a malformed one becomes None). A naive create_time is refused here, for every backend:
    PostgreSQL's rows reach the driver without the column type's own check."""
    columns: dict[str, list[Any]] = dict(
        zip(_COLUMNS, map(list, zip(*entries, strict=True)), strict=True)
    )
    if any(created.tzinfo is None for created in columns["create_time"]):
        raise ValueError("naive datetimes are ambiguous; a create_time must be aware")
    columns["id"] = [new_id() for _ in entries]
    for name, limit in _TEXT_LIMITS:
        columns[name] = [
            text[:limit] if isinstance(text, str) and len(text) > limit else text
            for text in columns[name]
        ]
    # A batch holds few distinct organizations: each one's id is parsed once per batch.
    organizations: dict[object, uuid.UUID | None] = {}
    parsed = []
    for organization in columns["organization_id"]:
        known = organizations.get(organization, _UNSEEN)
        if known is _UNSEEN:
            known = organizations[organization] = _as_uuid(organization)
        parsed.append(known)
    columns["organization_id"] = parsed
    return columns


_UNSEEN = object()
_TABLE = cast(Table, RequestLogEntry.__table__)
_ORGANIZATIONS = cast(Table, Organization.__table__)
#: What the writer inserts, in the order it sends each row.
INSERTED_COLUMNS = ("id", *_COLUMNS)


#: The composite type of one batch row (migration 0007), attributes in ``INSERTED_COLUMNS`` order.
ROW_TYPE = "request_log_row"


class _RowArray(UserDefinedType[list[tuple[Any, ...]]]):
    """PostgreSQL's ``request_log_row[]`` (migration 0007): a batch as one array of rows.
    The rows are tuples in ``INSERTED_COLUMNS`` order, handed to the driver as they are."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return f"{ROW_TYPE}[]"


def _unnest_insert() -> Insert:
    """PostgreSQL: one INSERT ... SELECT FROM unnest(rows) per chunk, the chunk one array
    parameter of composite rows, so a chunk is a single Bind/Execute whatever its size (an
    executemany sends one per row, and each row is a separate executor run on the server).
    One array of rows rather than one array per column: asyncpg checks every element of an
    array for nesting before encoding it, and for eleven arrays those checks were the
    larger part of the writer's CPU. The LEFT JOIN keeps an organization id only when it
    names an organization the statement can see (under Tenant.all(), every one): an
    unknown one is stored as NULL instead of failing the batch on the foreign key, with
    no separate look-up first."""
    rows = cast_(bindparam("rows", type_=_RowArray()), _RowArray())
    entry = func.unnest(rows).table_valued(*INSERTED_COLUMNS).render_derived(name="entry")
    organization = _ORGANIZATIONS.c.id
    selected = select(
        *(organization if name == "organization_id" else entry.c[name] for name in INSERTED_COLUMNS)
    ).select_from(entry.outerjoin(_ORGANIZATIONS, organization == entry.c.organization_id))
    return insert(_TABLE).from_select(INSERTED_COLUMNS, selected)


_UNNEST_INSERT = _unnest_insert()


async def insert_request_log(database: Database, entries: Sequence[LoggedCall]) -> None:
    """Write a batch of entries in one Tenant.all() transaction."""
    if not entries:
        return
    columns = _columns(entries)
    async with database.transaction(Tenant.all()) as session:
        if session.get_bind().dialect.name == "postgresql":
            rows = list(zip(*(columns[name] for name in INSERTED_COLUMNS), strict=True))
            for start in range(0, len(rows), INSERT_CHUNK_ROWS):
                await session.execute(
                    _UNNEST_INSERT, {"rows": rows[start : start + INSERT_CHUNK_ROWS]}
                )
        else:
            await _insert_rows(session, columns)


async def _insert_rows(session: AsyncSession, columns: dict[str, list[Any]]) -> None:
    """SQLite, MariaDB/MySQL: the organizations are looked up, then an executemany."""
    names = list(columns)
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    org_ids = set(columns["organization_id"]) - {None}
    if org_ids:
        known = set(
            (
                await session.execute(select(Organization.id).where(Organization.id.in_(org_ids)))
            ).scalars()
        )
        for row in rows:
            if row["organization_id"] not in known:
                row["organization_id"] = None
    # executemany of one cached statement, not a multi-row VALUES
    # whose SQL differs with every batch size and is compiled every time.
    statement = insert(_TABLE)
    for start in range(0, len(rows), INSERT_CHUNK_ROWS):
        await session.execute(statement, rows[start : start + INSERT_CHUNK_ROWS])


@dataclass(frozen=True, slots=True)
class RequestLogFilter:
    """Set fields are ANDed; ``create_time`` in [start, end)."""

    method: str | None = None
    status_code: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None


class RequestLogRepository(Repository[RequestLogEntry]):
    """Reads of the log; a one-organization tenant sees only the calls scoped to it."""

    model = RequestLogEntry
    resource_type = "ferrule.v1.RequestLog"
    collection = "requestLogs"

    async def list(
        self,
        flt: RequestLogFilter | None = None,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        order_by: str | None = None,
        include_total: bool = False,
    ) -> Page[RequestLogEntry]:
        """A keyset page, newest first unless ``order_by`` is ``"create_time"``."""
        keys = sort_keys(order_by)
        stmt = self.select()
        flt = flt or RequestLogFilter()
        if flt.method is not None:
            stmt = stmt.where(RequestLogEntry.method == flt.method)
        if flt.status_code is not None:
            stmt = stmt.where(RequestLogEntry.status_code == flt.status_code)
        if flt.start_time is not None:
            stmt = stmt.where(RequestLogEntry.create_time >= flt.start_time)
        if flt.end_time is not None:
            stmt = stmt.where(RequestLogEntry.create_time < flt.end_time)
        return await paginate(
            self.session,
            stmt,
            keys,
            page_size=page_size,
            cursor=cursor,
            include_total=include_total,
        )

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 5000) -> int:
        """Delete up to ``limit`` entries logged before ``cutoff``; returns how many."""
        victims = self.scoped(
            select(RequestLogEntry.id).where(RequestLogEntry.create_time < cutoff).limit(limit)
        )
        result = await self.session.execute(
            delete(RequestLogEntry)
            .where(RequestLogEntry.id.in_(bounded(victims).scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


def sort_keys(order_by: str | None) -> list[SortKey]:
    """Parse ``order_by`` ("create_time desc" default, or "create_time")."""
    return parse_order_by(order_by, ORDERABLE, default=DEFAULT_ORDER, tiebreaker=RequestLogEntry.id)
