"""Keyset paging over SQL *expressions* (not only mapped columns), for the analyses list.

``db.pagination.paginate`` needs NOT NULL mapped columns as sort keys. Analyses may be
ordered by ``processing_duration``, a nullable column; sorting it as
``coalesce(processing_ms, -1)`` (the column is CHECK-constrained non-negative) gives a
total, backend-independent order in which rows without a duration come first
ascending and last descending, so the keyset stays exact on PostgreSQL and SQLite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, and_, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from db.errors import FieldViolation, ValidationError
from db.pagination import JSONValue, Page, clamp_page_size, encode_value

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExpressionKey:
    """One ordering term: the SQL expression, its direction and how to read it off a row."""

    name: str
    expression: ColumnElement[Any] | InstrumentedAttribute[Any]
    value_of: Callable[[Any], Any]
    descending: bool = False
    #: Python type of the cursor value, to decode it from JSON.
    python_type: type = str


def _bad_token() -> ValidationError:
    return ValidationError(
        [FieldViolation("page_token", "the page token does not belong to this query")]
    )


def _decode(key: ExpressionKey, value: JSONValue) -> Any:
    try:
        if key.python_type is datetime and isinstance(value, str):
            return datetime.fromisoformat(value)
        if (
            key.python_type is float
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            return float(value)
        if key.python_type is uuid.UUID and isinstance(value, str):
            return uuid.UUID(value)
        if key.python_type is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    raise _bad_token()


def _after(keys: Sequence[ExpressionKey], values: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the lexicographic order of ``keys``."""
    # Bind through each expression's type so e.g. datetimes are normalised as stored.
    bound = [literal(v, k.expression.type) for k, v in zip(keys, values, strict=True)]
    clauses = []
    for i, key in enumerate(keys):
        equal = [keys[j].expression == bound[j] for j in range(i)]
        beyond = key.expression < bound[i] if key.descending else key.expression > bound[i]
        clauses.append(and_(*equal, beyond))
    return or_(*clauses)


async def paginate_expressions(
    session: AsyncSession,
    stmt: Select[T],
    keys: Sequence[ExpressionKey],
    *,
    page_size: int,
    cursor: Sequence[JSONValue] | None = None,
    include_total: bool = False,
) -> Page[T]:
    """One page of ``stmt`` (a select of one ORM entity) ordered by ``keys``.

    ``keys`` must end with a unique key (the id) so the order is total.
    """
    size = clamp_page_size(page_size)
    total: int | None = None
    if include_total:
        counted = select(func.count()).select_from(stmt.order_by(None).subquery())
        total = (await session.execute(counted)).scalar_one()
    page_stmt = stmt
    if cursor is not None:
        if len(cursor) != len(keys):
            raise _bad_token()
        values = [_decode(k, v) for k, v in zip(keys, cursor, strict=True)]
        page_stmt = page_stmt.where(_after(keys, values))
    order = [k.expression.desc() if k.descending else k.expression.asc() for k in keys]
    page_stmt = page_stmt.order_by(None).order_by(*order).limit(size + 1)
    rows: list[T] = list((await session.execute(page_stmt)).scalars().all())
    next_cursor: list[JSONValue] | None = None
    if len(rows) > size:
        rows = rows[:size]
        next_cursor = [encode_value(k.value_of(rows[-1])) for k in keys]
    return Page(items=rows, next_cursor=next_cursor, total_size=total)
