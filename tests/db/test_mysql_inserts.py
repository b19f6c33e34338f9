"""INSERT IGNORE on MariaDB skips duplicate keys and nothing else.

MySQL's nearest to ON CONFLICT DO NOTHING also turns bad data into a clipped value and a
warning; the warning count after each insert tells the two apart. These go straight to
the data layer (nothing in front has validated the rows), on a real MariaDB.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import cast

import pytest
from sqlalchemy import Table, func, select

from db.engine import Database, DatabaseConfig
from db.errors import ValidationError
from db.models import Organization, Prediction
from db.repositories.mysql_inserts import insert_skipping_duplicates
from db.repositories.organizations import OrganizationsRepository
from db.repositories.prediction_ingest import PendingBatch, StagedRow, ingest_batches
from db.tenancy import Tenant

NOW = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
async def mariadb(mariadb_database_url: str) -> AsyncIterator[Database]:
    database = Database(DatabaseConfig(url=mariadb_database_url, pool_size=2))
    yield database
    await database.dispose()


@pytest.fixture
async def org(mariadb: Database) -> Organization:
    async with mariadb.transaction(Tenant.all()) as session:
        return await OrganizationsRepository(session, Tenant.all()).create("ignore")


def values(org: Organization, row_id: uuid.UUID, subject: str = "s") -> dict[str, object]:
    return {
        "id": row_id,
        "organization_id": org.id,
        "subject_id": subject,
        "probability": 0.5,
        "risk_level": "MEDIUM",
        "model_name": "m",
        "model_version": "v1",
        "features": None,
        "predict_time": NOW,
        "request_id": None,
        "create_time": NOW,
        "create_by": "t",
    }


async def stored(database: Database, org: Organization) -> int:
    async with database.transaction(Tenant.of(org.id), read_only=True) as session:
        count = select(func.count()).where(Prediction.organization_id == org.id)
        return int((await session.execute(count)).scalar_one())


async def test_duplicates_are_skipped_and_the_rest_written(
    mariadb: Database, org: Organization
) -> None:
    table = cast(Table, Prediction.__table__)
    first, second = uuid.uuid4(), uuid.uuid4()
    async with mariadb.transaction(Tenant.of(org.id)) as session:
        assert await insert_skipping_duplicates(
            session, table, [values(org, first)], table.c.id
        ) == {first}
    async with mariadb.transaction(Tenant.of(org.id)) as session:
        written = await insert_skipping_duplicates(
            session, table, [values(org, first), values(org, second), values(org, second)],
            table.c.id,
        )  # fmt: skip
    assert written == {second}
    assert await stored(mariadb, org) == 2


async def test_a_value_mysql_would_clip_is_refused_and_nothing_is_written(
    mariadb: Database, org: Organization
) -> None:
    table = cast(Table, Prediction.__table__)
    rows = [values(org, uuid.uuid4()), values(org, uuid.uuid4(), subject="x" * 200)]
    with pytest.raises(ValidationError):
        async with mariadb.transaction(Tenant.of(org.id)) as session:
            await insert_skipping_duplicates(session, table, rows, table.c.id)
    assert await stored(mariadb, org) == 0


def staged(row_id: uuid.UUID, batch: str, subject: str = "s") -> StagedRow:
    return (row_id, subject, 0.25, "LOW", "m", "v1", '{"a": 1}', NOW, batch)


async def test_ingest_counts_duplicates_and_refuses_clipped_values(
    mariadb: Database, org: Organization
) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    batch = PendingBatch("b-1", [staged(i, "b-1") for i in ids], valid=3)
    async with mariadb.transaction(Tenant.of(org.id)) as session:
        counts = await ingest_batches(session, org.id, "t", [batch])
    assert [(c.accepted, c.duplicates) for c in counts] == [(3, 0)]
    # Rows already stored (another batch id, same row ids): skipped and counted.
    again = PendingBatch("b-2", [staged(ids[0], "b-2"), staged(uuid.uuid4(), "b-2")], valid=2)
    async with mariadb.transaction(Tenant.of(org.id)) as session:
        counts = await ingest_batches(session, org.id, "t", [again])
    assert [(c.accepted, c.duplicates) for c in counts] == [(1, 1)]
    # A subject too long for its column (the stream validates; this bypasses it).
    bad = PendingBatch("b-3", [staged(uuid.uuid4(), "b-3", subject="x" * 200)], valid=1)
    with pytest.raises(ValidationError):
        async with mariadb.transaction(Tenant.of(org.id)) as session:
            await ingest_batches(session, org.id, "t", [bad])
    assert await stored(mariadb, org) == 4
