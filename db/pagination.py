"""Keyset pagination (AIP-158 without OFFSET) over any ORM select.

A page is "the rows after the last one the caller saw" in a total order: the caller's
sort keys followed by ``id`` as the tiebreaker. Rows inserted or deleted between pages
neither shift nor repeat what is returned. The data layer only produces and consumes
the cursor as a list of plain JSON values; the server signs and encodes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Row, Select, and_, func, literal, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import KeyedColumnElement

from db.errors import FieldViolation, ValidationError

T = TypeVar("T")
U = TypeVar("U")
JSONValue = str | int | float | bool | None

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class SortKey:
    """One ordering column.

    A nullable column needs ``null_as``: the value NULL sorts as (e.g. -1 for a
    non-negative duration). Sorting on ``coalesce(column, null_as)`` makes the order total
    and the same on every backend, which the keyset needs to be exact.
    """

    #: A mapped column, or a named column of a derived table (e.g. a search's score).
    attribute: InstrumentedAttribute[Any] | KeyedColumnElement[Any]
    descending: bool = False
    null_as: Any = None

    @property
    def name(self) -> str:
        return self.attribute.key

    @property
    def sql(self) -> ColumnElement[Any] | InstrumentedAttribute[Any] | KeyedColumnElement[Any]:
        """What the ORDER BY and the keyset comparison use."""
        if self.null_as is None:
            return self.attribute
        return func.coalesce(self.attribute, literal(self.null_as, self.attribute.type))

    def value_of(self, row: Any) -> Any:
        value = getattr(row, self.name)
        return self.null_as if value is None else value


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    #: Cursor of the last item when more rows follow; None on the last page.
    next_cursor: list[JSONValue] | None
    #: Rows matching the filter across all pages, when asked for.
    total_size: int | None = None
    #: The order the page was read in, and the rows (parallel to ``items``) the keys
    #: read from: enough to continue after any item, for a caller that sends fewer.
    keys: Sequence[SortKey] = ()
    rows: Sequence[Any] = ()

    def cursor_after(self, count: int) -> list[JSONValue] | None:
        """The cursor that continues right after the first ``count`` items.

        Computed only when asked: a caller that stops early (a response that would
        outgrow its byte budget) pays for one cursor, not one per row."""
        if count >= len(self.items):
            return self.next_cursor
        if count <= 0:
            raise ValueError("a page continues after at least one item")
        return [encode_value(key.value_of(self.rows[count - 1])) for key in self.keys]

    def map(self, view: Callable[[T], U]) -> Page[U]:
        """The same page with each item seen through ``view`` (same cursors)."""
        return Page(
            [view(item) for item in self.items],
            self.next_cursor,
            self.total_size,
            self.keys,
            self.rows,
        )


def _invalid(field: str, description: str) -> ValidationError:
    return ValidationError([FieldViolation(field, description)])


def parse_order_by(
    order_by: str | None,
    allowed: Mapping[str, InstrumentedAttribute[Any] | SortKey],
    *,
    default: Sequence[SortKey],
    tiebreaker: InstrumentedAttribute[Any],
) -> list[SortKey]:
    """AIP-132 ``order_by`` ("create_time desc, email") -> sort keys ending with ``tiebreaker``.

    Unknown fields and malformed clauses are a ValidationError on ``order_by``. The
    tiebreaker follows the direction of the last key so a single index can serve the scan.
    """
    keys: list[SortKey] = []
    if order_by and order_by.strip():
        for clause in order_by.split(","):
            parts = clause.split()
            if not parts or len(parts) > 2 or (len(parts) == 2 and parts[1] not in {"asc", "desc"}):
                raise _invalid("order_by", f"cannot parse {clause.strip()!r}")
            if parts[0] not in allowed:
                choices = ", ".join(sorted(allowed))
                raise _invalid("order_by", f"unknown field {parts[0]!r}; use one of {choices}")
            choice = allowed[parts[0]]
            template = choice if isinstance(choice, SortKey) else SortKey(choice)
            if any(k.name == template.name for k in keys):
                raise _invalid("order_by", f"{parts[0]!r} appears twice")
            descending = len(parts) == 2 and parts[1] == "desc"
            keys.append(replace(template, descending=descending))
    else:
        keys = list(default)
    if keys[-1].name != tiebreaker.key:
        keys.append(SortKey(tiebreaker, descending=keys[-1].descending))
    return keys


def encode_value(value: Any) -> JSONValue:
    """A sort value as a JSON-able value (datetimes ISO 8601, UUIDs and enums as strings)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return str(value.value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot use a {type(value).__name__} as a sort key")


def _decode_value(key: SortKey, value: JSONValue) -> Any:
    try:
        python_type = key.attribute.type.python_type
    except NotImplementedError:
        return value
    try:
        if python_type is datetime and isinstance(value, str):
            return datetime.fromisoformat(value)
        if python_type is uuid.UUID and isinstance(value, str):
            return uuid.UUID(value)
        if python_type is float and isinstance(value, int | float):
            return float(value)
        if python_type is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if python_type is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    raise _invalid("page_token", "the page token does not belong to this query")


def _after(keys: Sequence[SortKey], values: Sequence[Any]) -> ColumnElement[bool]:
    """WHERE clause selecting the rows strictly after ``values`` in the order of ``keys``."""
    # Bind through each column's type so e.g. datetimes are normalised as stored.
    values = [literal(v, k.attribute.type) for k, v in zip(keys, values, strict=True)]
    if all(k.descending == keys[0].descending for k in keys):
        # A row-value comparison lets the composite index serve the range scan directly.
        row = tuple_(*(k.sql for k in keys))
        bound = tuple_(*values)
        return row < bound if keys[0].descending else row > bound
    clauses = []
    for i, key in enumerate(keys):
        equal = [keys[j].sql == values[j] for j in range(i)]
        beyond = key.sql < values[i] if key.descending else key.sql > values[i]
        clauses.append(and_(*equal, beyond))
    return or_(*clauses)


def clamp_page_size(page_size: int) -> int:
    """AIP-158: 0 means the default, above the maximum is lowered, negative is invalid."""
    if page_size < 0:
        raise _invalid("page_size", "must not be negative")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _page_statement(
    stmt: Select[T], keys: Sequence[SortKey], size: int, cursor: Sequence[JSONValue] | None
) -> Select[T]:
    page_stmt = stmt
    if cursor is not None:
        if len(cursor) != len(keys):
            raise _invalid("page_token", "the page token does not belong to this query")
        values = [_decode_value(k, v) for k, v in zip(keys, cursor, strict=True)]
        page_stmt = page_stmt.where(_after(keys, values))
    order = [k.sql.desc() if k.descending else k.sql.asc() for k in keys]
    return page_stmt.order_by(None).order_by(*order).limit(size + 1)


def _page(rows: list[T], keys: Sequence[SortKey], size: int, total: int | None) -> Page[T]:
    next_cursor: list[JSONValue] | None = None
    if len(rows) > size:
        rows = rows[:size]
        last = rows[-1]
        next_cursor = [encode_value(k.value_of(last)) for k in keys]
    return Page(items=rows, next_cursor=next_cursor, total_size=total, keys=keys, rows=rows)


async def paginate(
    session: AsyncSession,
    stmt: Select[T],
    keys: Sequence[SortKey],
    *,
    page_size: int,
    cursor: Sequence[JSONValue] | None = None,
    include_total: bool = False,
) -> Page[T]:
    """One page of ``stmt`` (a select of one ORM entity) in the order of ``keys``.

    Fetches ``page_size + 1`` rows to learn whether another page follows, in one
    statement; the total is a second (COUNT) statement, only when asked for.
    """
    size = clamp_page_size(page_size)
    total: int | None = None
    if include_total:
        counted = select(func.count()).select_from(stmt.order_by(None).subquery())
        total = (await session.execute(counted)).scalar_one()
    page_stmt = _page_statement(stmt, keys, size, cursor)
    rows = list((await session.execute(page_stmt)).unique().scalars().all())
    return _page(rows, keys, size, total)


async def paginate_rows(
    session: AsyncSession,
    stmt: Select[*tuple[Any, ...]],
    keys: Sequence[SortKey],
    *,
    page_size: int,
    cursor: Sequence[JSONValue] | None = None,
) -> Page[Row[Any]]:
    """One page of ``stmt``'s rows (a select of named columns, ``keys`` among them), as
    :func:`paginate` reads it; for orders over computed values such as a search score."""
    size = clamp_page_size(page_size)
    page_stmt = _page_statement(stmt, keys, size, cursor)
    rows: list[Row[Any]] = list((await session.execute(page_stmt)).all())
    return _page(rows, keys, size, None)
