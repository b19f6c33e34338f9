"""Every engine Ferrule creates hides SQL parameter values from error texts and logs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db.engine import Database, DatabaseConfig

REPO = Path(__file__).resolve().parents[2]
PRODUCTION_CODE = ("db", "server", "migrations")
ENGINE_CONSTRUCTORS = {
    "create_async_engine",
    "create_engine",
    "engine_from_config",
    "async_engine_from_config",
}


def _engine_constructor_uses(path: Path) -> list[str]:
    """SQLAlchemy engine constructors imported by name or reached as attributes."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            uses += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {alias.name}"
                for alias in node.names
                if alias.name in ENGINE_CONSTRUCTORS
            ]
        elif isinstance(node, ast.Attribute) and node.attr in ENGINE_CONSTRUCTORS:
            uses.append(f"{path.relative_to(REPO)}:{node.lineno} uses .{node.attr}")
    return uses


def test_engines_are_only_created_by_the_factory() -> None:
    """db/engine_factory.py is the one place that may use SQLAlchemy's constructors."""
    found = []
    for top in PRODUCTION_CODE:
        for path in sorted((REPO / top).rglob("*.py")):
            if path.relative_to(REPO).as_posix() != "db/engine_factory.py":
                found += _engine_constructor_uses(path)
    assert found == []
    assert _engine_constructor_uses(REPO / "db" / "engine_factory.py")  # the check can see


async def test_a_failing_statement_does_not_carry_its_parameters(
    empty_database_url: str,
) -> None:
    database = Database(DatabaseConfig(url=empty_database_url))
    canary = "canary-parameter-7d1f0c"
    try:
        assert all(engine.sync_engine.hide_parameters for engine in database.engines)
        async with database.engine.connect() as conn:
            with pytest.raises(DBAPIError) as failed:
                await conn.execute(
                    text("SELECT * FROM no_such_table WHERE x = :secret"), {"secret": canary}
                )
        assert canary not in str(failed.value)
        assert "parameters" in str(failed.value)  # SQLAlchemy says they are hidden
    finally:
        await database.dispose()
