"""Enum columns read back as their members, through each dialect's result processor:
every member of every enum column, by identity; a value outside the enum is refused as
the enum refuses it; NULL stays None."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Dialect, make_url

from db.models.base import Base, EnumString

DIALECTS: dict[str, Dialect] = {
    name: make_url(url).get_dialect()()
    for name, url in {
        "postgresql": "postgresql+asyncpg://",
        "sqlite": "sqlite+aiosqlite://",
        "mariadb": "mariadb+asyncmy://",
    }.items()
}
ENUM_COLUMNS: dict[str, EnumString[Any]] = {
    f"{table.name}.{column.name}": column.type
    for table in Base.metadata.sorted_tables
    for column in table.columns
    if isinstance(column.type, EnumString)
}


def _processor(column_type: EnumString[Any], dialect: Dialect) -> Any:
    process = column_type.dialect_impl(dialect).result_processor(dialect, None)
    assert process is not None
    return process


def test_the_models_have_enum_columns() -> None:
    assert "users.role" in ENUM_COLUMNS


@pytest.mark.parametrize("dialect", DIALECTS.values(), ids=DIALECTS.keys())
@pytest.mark.parametrize("column", ENUM_COLUMNS, ids=ENUM_COLUMNS.keys())
def test_every_stored_value_reads_back_as_its_member(column: str, dialect: Dialect) -> None:
    column_type = ENUM_COLUMNS[column]
    process = _processor(column_type, dialect)
    for member in column_type.enum_type:
        # The driver hands back a plain str.
        assert process(str(member.value)) is member
    assert process(None) is None
    with pytest.raises(ValueError, match="is not a valid"):
        process("NOT_A_MEMBER")
