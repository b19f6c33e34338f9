"""PostgreSQL's request-log batch row (migration 0007) is what the writer sends: the
writer's columns in its order, each of the column's own type (text for the bounded text
columns, which the writer cuts itself). A column the writer gains without the type
following fails here, not by storing values in the wrong columns."""

from __future__ import annotations

import asyncpg

from db.repositories.request_log import INSERTED_COLUMNS, ROW_TYPE

ATTRIBUTES = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE c.relname = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


async def test_the_row_type_has_the_writers_columns_in_order_with_the_columns_types(
    pg_database_url: str,
) -> None:
    connection = await asyncpg.connect(pg_database_url.replace("+asyncpg", ""))
    try:
        row_type = [(name, kind) for name, kind in await connection.fetch(ATTRIBUTES, ROW_TYPE)]
        table = {name: kind for name, kind in await connection.fetch(ATTRIBUTES, "request_log")}
    finally:
        await connection.close()
    assert [name for name, _ in row_type] == list(INSERTED_COLUMNS)
    expected = [
        "text" if table[name].startswith("character varying") else table[name]
        for name in INSERTED_COLUMNS
    ]
    assert [kind for _, kind in row_type] == expected
