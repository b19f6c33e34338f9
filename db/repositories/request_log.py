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
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select

from db.engine import Database
from db.models import Organization, RequestLogEntry, new_id
from db.pagination import JSONValue, Page, SortKey, paginate, parse_order_by
from db.repositories.base import Repository, bounded
from db.tenancy import Tenant

ORDERABLE = {"create_time": RequestLogEntry.create_time}
DEFAULT_ORDER = (SortKey(RequestLogEntry.create_time, descending=True),)
#: Rows per INSERT: 11 bind parameters a row stays well below asyncpg's 32767.
INSERT_CHUNK_ROWS = 1000

_COLUMNS = (
    "method",
    "caller",
    "organization_id",
    "peer",
    "user_agent",
    "status_code",
    "latency_ms",
    "request_bytes",
    "trace_id",
    "create_time",
)
# Lengths of the bounded text columns: over-long values are cut, not refused.
_LIMITS = {
    name: getattr(RequestLogEntry.__table__.c[name].type, "length", None)
    for name in ("method", "caller", "peer", "user_agent", "status_code", "trace_id")
}


def _as_uuid(value: object) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and value:
        try:
            return uuid.UUID(value)
        except ValueError:
            return None
    return None


_TEXT_LIMITS = tuple((name, limit) for name, limit in _LIMITS.items() if limit is not None)


def _rows(entries: Sequence[object]) -> list[dict[str, Any]]:
    # getattr, not dataclasses.asdict: asdict deep-copies every field (measurably slow
    # for a writer that handles every RPC of the process). A batch holds few distinct
    # organizations, so each one's id is parsed once per batch.
    organizations: dict[object, uuid.UUID | None] = {}
    rows = []
    for entry in entries:
        row = {name: getattr(entry, name, None) for name in _COLUMNS}
        row["id"] = new_id()
        organization = row["organization_id"]
        parsed = organizations.get(organization, _UNSEEN)
        if parsed is _UNSEEN:
            parsed = organizations[organization] = _as_uuid(organization)
        row["organization_id"] = parsed
        for name, limit in _TEXT_LIMITS:
            text = row[name]
            if isinstance(text, str) and len(text) > limit:
                row[name] = text[:limit]
        rows.append(row)
    return rows


_UNSEEN = object()


async def insert_request_log(database: Database, entries: Sequence[object]) -> None:
    """Write a batch of entries (dataclass instances) in one Tenant.all() transaction."""
    if not entries:
        return
    rows = _rows(entries)
    tenant = Tenant.all()
    table = cast(Table, RequestLogEntry.__table__)
    async with database.transaction(tenant) as session:
        org_ids = {row["organization_id"] for row in rows} - {None}
        if org_ids:
            known = set(
                (
                    await session.execute(
                        select(Organization.id).where(Organization.id.in_(org_ids))
                    )
                ).scalars()
            )
            for row in rows:
                if row["organization_id"] not in known:
                    row["organization_id"] = None
        # executemany of one cached statement (asyncpg pipelines it), not a multi-row
        # VALUES whose SQL differs with every batch size and is compiled every time.
        statement = insert(table)
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
