"""Point reads (db/point_reads.py): the session's answers, RLS, deadlines, cancellation and
observability, on the driver connection instead of an ORM session; and every cached
Get's record read (db/repositories/base.py RecordRead) against its session Get."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from argon2 import PasswordHasher
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import (
    Double,
    Float,
    Integer,
    Numeric,
    bindparam,
    cast,
    func,
    insert,
    literal,
    select,
)

from db.engine import Database, DatabaseConfig
from db.errors import NotFoundError, StatementTimeoutError
from db.models import Organization, RiskLevel, User, UserRole, new_id
from db.models.enums import AnalysisType, OptimizationTier
from db.observability import install_statement_observers, statement_context
from db.point_reads import PointRead, PointReader
from db.repositories.analyses import AnalysesRepository, NewAnalysis, read_analysis_record
from db.repositories.base import Repository
from db.repositories.batches import BatchesRepository
from db.repositories.organizations import OrganizationsRepository, read_organization_record
from db.repositories.predictions import (
    PredictionsRepository,
    PredictionValues,
    read_prediction_record,
)
from db.repositories.users import ProfileFields, UserRecord, UsersRepository, read_user_record
from db.tenancy import Tenant
from tests.db.conftest import APP_ROLE
from tests.polling import eventually

METHOD = "ferrule.v1.UserService/GetUser"
# Deliberately no organization filter: only row-level security stands between tenants.
USER_ID_ONLY = PointRead(select(User.__table__.c.id).where(User.__table__.c.id == bindparam("u")))
SLEEP = PointRead(select(func.pg_sleep(literal(2.0))))


@pytest.fixture(params=["session-scoped", "transaction-scoped"])
async def database(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """Both PostgreSQL paths: the dedicated point-read pool (one connection, so tenants
    take turns on it) and the transaction-scoped batch used without it (PgBouncer)."""
    postgres = database_url.startswith("postgresql")
    db = Database(
        DatabaseConfig(
            url=database_url,
            app_role=APP_ROLE if postgres else None,
            pool_size=5,
            point_read_pool_size=1 if request.param == "session-scoped" else 0,
        )
    )
    assert (db.point_read_pool is not None) == (postgres and request.param == "session-scoped")
    yield db
    await db.dispose()


async def _user(database: Database, tenant: Tenant, hasher: PasswordHasher) -> uuid.UUID:
    async with database.transaction(tenant) as session:
        user = await UsersRepository(session, tenant, password_hasher=hasher).create(
            email=f"{uuid.uuid4().hex[:8]}@example.com",
            username="ada",
            full_name="Ada L",
            role=UserRole.ADMIN,
            password="correct horse battery",
            profile=ProfileFields(bio="hello", locale="en-GB"),
        )
        return user.id


def _types(record: UserRecord) -> list[type]:
    return [type(getattr(record, f.name)) for f in dataclasses.fields(record)]


async def test_a_point_read_returns_what_the_session_read_returns(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> None:
    user_id = await _user(database, tenant_a, cheap_hasher)
    async with database.transaction(tenant_a, read_only=True) as session:
        through_session = await UsersRepository(session, tenant_a).get_user_record(user_id)
    through_driver = await read_user_record(database.point_reader(tenant_a), user_id)
    assert through_driver == through_session
    # Same Python types, not just equal values (asyncpg alone returns str for the enum).
    assert _types(through_driver) == _types(through_session)
    assert type(through_driver.role) is UserRole
    assert through_driver.profile is not None and through_driver.profile.bio == "hello"


async def test_another_organizations_user_is_not_found(
    database: Database, tenant_a: Tenant, tenant_b: Tenant, cheap_hasher: PasswordHasher
) -> None:
    user_id = await _user(database, tenant_a, cheap_hasher)
    with pytest.raises(NotFoundError):
        await read_user_record(database.point_reader(tenant_b), user_id)
    with pytest.raises(NotFoundError):
        await read_user_record(database.point_reader(Tenant(None)), user_id)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_row_level_security_applies_to_point_reads(
    database: Database, tenant_a: Tenant, tenant_b: Tenant, cheap_hasher: PasswordHasher
) -> None:
    user_id = await _user(database, tenant_a, cheap_hasher)
    assert await database.point_reader(tenant_a).fetch_row(USER_ID_ONLY, {"u": user_id}) == (
        user_id,
    )
    assert await database.point_reader(tenant_b).fetch_row(USER_ID_ONLY, {"u": user_id}) is None


def _pg(database: Database) -> str:
    return database.config.url.replace("+asyncpg", "")


async def _open_transactions(database: Database) -> int:
    watcher = await asyncpg.connect(_pg(database))
    try:
        count: int = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
        )
        return count
    finally:
        await watcher.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_numbers_come_back_as_through_a_session(database: Database, tenant_a: Tenant) -> None:
    # The numeric result processors depend on the type the server sends (float or numeric).
    read = PointRead(
        select(
            cast(literal(1.5), Double),
            cast(literal(1.5), Float(asdecimal=True)),
            cast(literal("1.25"), Numeric(10, 2)),
            cast(literal("1.25"), Numeric(10, 2, asdecimal=False)),
            cast(literal(2), Integer),
        )
    )
    async with database.transaction(tenant_a, read_only=True) as session:
        through_session = (await session.execute(read.statement)).one()
    through_driver = await database.point_reader(tenant_a).fetch_row(read, {})
    assert through_driver is not None
    assert tuple(through_driver) == tuple(through_session)
    assert [type(v) for v in through_driver] == [type(v) for v in through_session]
    assert [type(v).__name__ for v in through_driver] == [
        "float",
        "Decimal",
        "Decimal",
        "float",
        "int",
    ]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_deadline_cancels_the_statement(database: Database, org_a: Organization) -> None:
    reader = database.point_reader(Tenant.of(org_a.id), timeout_ms=50)
    with pytest.raises(StatementTimeoutError):
        await reader.fetch_row(SLEEP, {})
    assert database.pool_status().checked_out == 0
    assert await _open_transactions(database) == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_cancelled_reads_return_their_connections_clean(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> None:
    user_id = await _user(database, tenant_a, cheap_hasher)
    reader = database.point_reader(tenant_a)
    for delay in (0.0, 0.001, 0.005, 0.02, 0.1):
        tasks = [asyncio.create_task(reader.fetch_row(SLEEP, {})) for _ in range(3)]
        await asyncio.sleep(delay)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)

    async def all_returned_clean() -> bool:
        checked_out = database.pool_status().checked_out
        if database.point_read_pool is not None:
            checked_out += database.point_read_pool.checked_out
        return checked_out == 0 and await _open_transactions(database) == 0

    await eventually(all_returned_clean, what="every cancelled read's connection back, clean")
    # Every pooled connection still answers in step.
    records = await asyncio.gather(*(read_user_record(reader, user_id) for _ in range(10)))
    assert {r.id for r in records} == {user_id}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_point_reads_are_traced_commented_and_digested(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> None:
    user_id = await _user(database, tenant_a, cheap_hasher)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observers = install_statement_observers(
        database.engine, slow_query_ms=50, tracer_provider=provider
    )
    for engine in database.engines[1:]:
        observers.attach(engine)
    try:
        tracer = provider.get_tracer("test")
        with statement_context(METHOD, tenant=str(tenant_a.organization_id)):
            with tracer.start_as_current_span("rpc"):
                await read_user_record(database.point_reader(tenant_a), user_id)
            # Slow: in the digest under its normalized text.
            await database.point_reader(tenant_a, timeout_ms=5000).fetch_row(
                PointRead(select(func.pg_sleep(literal(0.1)))), {}
            )
    finally:
        observers.close()
        provider.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    statement = next(s for name, s in spans.items() if name.startswith("SELECT"))
    assert statement.parent is not None
    assert statement.parent.span_id == spans["rpc"].context.span_id
    attributes = dict(statement.attributes or {})
    assert attributes["db.rows_affected"] == 1
    assert attributes["db.system"] == "postgresql"
    waited = attributes["db.client.connection.wait_time_ms"]  # the checkout is timed
    assert isinstance(waited, float) and waited >= 0
    assert str(user_id) not in " ".join(str(v) for v in attributes.values())
    assert "FROM users" in str(attributes["db.query.text"])
    assert observers.statistics.snapshot().total == 2
    # Only the sleep must be slow; on a busy machine the user read may be too.
    slow = next(e for e in observers.slow_queries.top(5) if "pg_sleep" in e.statement)
    assert slow.rpc_methods == ((METHOD, 1),)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_tenants_taking_turns_on_one_connection_each_see_only_their_rows(
    database: Database, tenant_a: Tenant, tenant_b: Tenant, cheap_hasher: PasswordHasher
) -> None:
    a_user = await _user(database, tenant_a, cheap_hasher)
    b_user = await _user(database, tenant_b, cheap_hasher)
    a, b = database.point_reader(tenant_a), database.point_reader(tenant_b)
    for _ in range(3):
        assert await a.fetch_row(USER_ID_ONLY, {"u": a_user}) == (a_user,)
        assert await a.fetch_row(USER_ID_ONLY, {"u": b_user}) is None
        assert await b.fetch_row(USER_ID_ONLY, {"u": b_user}) == (b_user,)
        assert await b.fetch_row(USER_ID_ONLY, {"u": a_user}) is None
    none = database.point_reader(Tenant(None))
    assert await none.fetch_row(USER_ID_ONLY, {"u": a_user}) is None
    everyone = database.point_reader(Tenant.all())
    assert await everyone.fetch_row(USER_ID_ONLY, {"u": b_user}) == (b_user,)
    role = await a.fetch_row(PointRead(select(func.current_user())), {})
    assert role == (APP_ROLE,)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_point_reads_cannot_write(database: Database, tenant_a: Tenant) -> None:
    # A data-modifying CTE is still a SELECT statement to the driver.
    inserted = (
        insert(Organization)
        .values(
            id=uuid.uuid4(),
            display_name="sneaky",
            create_time=func.now(),
            update_time=func.now(),
            version=1,
        )
        .returning(Organization.id)
        .cte()
    )
    with pytest.raises(Exception, match="read-only transaction"):
        await database.point_reader(Tenant.all()).fetch_row(PointRead(select(inserted.c.id)), {})


# --- every cached Get's record read against its session Get --------------------------
@dataclasses.dataclass(frozen=True)
class Kind:
    """One record read: how to make a row, its repository and its read."""

    repository: Callable[[Any, Tenant], Repository[Any]]
    #: Creates a row of ``tenant`` (whose organization is ``organization``); its id.
    make: Callable[[Database, Tenant, Organization], Awaitable[uuid.UUID]]
    read: Callable[[PointReader, uuid.UUID, bool], Awaitable[Any]]
    soft_deletes: bool = True


async def _organization(database: Database, tenant: Tenant, org: Organization) -> uuid.UUID:
    return org.id


async def _analysis(database: Database, tenant: Tenant, org: Organization) -> uuid.UUID:
    async with database.transaction(tenant) as session:
        batch = await BatchesRepository(session, tenant).create("b", create_by="tester")
        created = await AnalysesRepository(session, tenant).create(
            NewAnalysis(
                uuid.uuid4().hex,  # never deduplicated
                AnalysisType.SENTIMENT,
                optimization_tier=OptimizationTier.FAST,
                sentiment_score=-0.25,
                quality_score=0.5,
                emotion_scores={"joy": 0.75},
                result={"label": "neutral", "spans": [1, 2], "nested": {"ok": True}},
                processing_ms=12.5,
                model_used="m1",
                error_message="none",
                batch_id=batch.batch.id,
            ),
            create_by="tester",
        )
        return created.analysis.id


async def _prediction(database: Database, tenant: Tenant, org: Organization) -> uuid.UUID:
    values = PredictionValues(
        id=new_id(),
        organization_id=org.id,
        subject_id="emp-1",
        probability=0.625,
        risk_level=RiskLevel.HIGH,
        model_name="attrition",
        model_version="v1",
        features={"age": 41, "dept": "sales", "scores": [0.5, 1]},
        predict_time=datetime(2026, 1, 1, 12, 30, 0, 123456, tzinfo=UTC),
        request_id="req-1",
        create_time=datetime.now(UTC),
        create_by="tester",
    )
    async with database.transaction(tenant) as session:
        assert await PredictionsRepository(session, tenant).insert_many([values]) == {values.id}
    return values.id


async def _read_prediction(reader: PointReader, prediction_id: uuid.UUID, _: bool) -> Any:
    return await read_prediction_record(reader, prediction_id)


KINDS = {
    "organization": Kind(
        OrganizationsRepository,
        _organization,
        lambda reader, i, show_deleted: read_organization_record(
            reader, i, show_deleted=show_deleted
        ),
    ),
    "analysis": Kind(
        AnalysesRepository,
        _analysis,
        lambda reader, i, show_deleted: read_analysis_record(reader, i, show_deleted=show_deleted),
    ),
    "prediction": Kind(PredictionsRepository, _prediction, _read_prediction, soft_deletes=False),
}


async def _session_get(
    database: Database, kind: Kind, tenant: Tenant, resource_id: uuid.UUID, show_deleted: bool
) -> Any:
    async with database.transaction(tenant, read_only=True) as session:
        return await kind.repository(session, tenant).get(resource_id, show_deleted=show_deleted)


def _assert_same_columns(record: Any, row: Any) -> None:
    """The record carries every column of the row's table, equal in value and type."""
    names = [f.name for f in dataclasses.fields(record)]
    assert sorted(names) == sorted(type(row).__table__.c.keys())
    for name in names:
        ours, theirs = getattr(record, name), getattr(row, name)
        assert ours == theirs, name
        assert type(ours) is type(theirs), name


async def _not_found_both_ways(
    database: Database, kind: Kind, tenant: Tenant, resource_id: uuid.UUID, show_deleted: bool
) -> None:
    """Both reads raise NotFoundError, and the same one."""
    with pytest.raises(NotFoundError) as by_session:
        await _session_get(database, kind, tenant, resource_id, show_deleted)
    with pytest.raises(NotFoundError) as by_record:
        await kind.read(database.point_reader(tenant), resource_id, show_deleted)
    assert (by_record.value.resource_type, by_record.value.resource_name) == (
        by_session.value.resource_type,
        by_session.value.resource_name,
    )


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
async def test_a_record_read_returns_the_session_gets_columns(
    database: Database, org_a: Organization, tenant_a: Tenant, kind: Kind
) -> None:
    resource_id = await kind.make(database, tenant_a, org_a)
    for tenant in (tenant_a, Tenant.all()):
        row = await _session_get(database, kind, tenant, resource_id, True)
        for show_deleted in (True, False):
            record = await kind.read(database.point_reader(tenant), resource_id, show_deleted)
            _assert_same_columns(record, row)
            with pytest.raises(dataclasses.FrozenInstanceError):
                record.id = uuid.uuid4()


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
async def test_another_organizations_record_is_not_found(
    database: Database, org_a: Organization, tenant_a: Tenant, tenant_b: Tenant, kind: Kind
) -> None:
    resource_id = await kind.make(database, tenant_a, org_a)
    for tenant in (tenant_b, Tenant(None)):
        for show_deleted in (True, False):
            await _not_found_both_ways(database, kind, tenant, resource_id, show_deleted)
    await _not_found_both_ways(database, kind, tenant_a, uuid.uuid4(), True)


@pytest.mark.parametrize(
    "kind", [k for k in KINDS.values() if k.soft_deletes], ids=["organization", "analysis"]
)
async def test_soft_deleted_records_read_as_the_session_get_reads_them(
    database: Database, org_a: Organization, tenant_a: Tenant, kind: Kind
) -> None:
    resource_id = await kind.make(database, tenant_a, org_a)
    async with database.transaction(tenant_a) as session:
        await kind.repository(session, tenant_a).soft_delete(resource_id, delete_by="deleter")
    # Get answers for deleted rows by default (AIP-164) ...
    row = await _session_get(database, kind, tenant_a, resource_id, True)
    record = await kind.read(database.point_reader(tenant_a), resource_id, True)
    assert record.delete_time is not None and record.delete_by == "deleter"
    _assert_same_columns(record, row)
    # ... and not when asked for live rows only.
    await _not_found_both_ways(database, kind, tenant_a, resource_id, False)


def test_a_role_name_that_is_not_plain_is_refused() -> None:
    # It is inlined into the transaction-scoped settings batch, so it must never carry SQL.
    with pytest.raises(ValueError, match="plain role name"):
        DatabaseConfig(url="postgresql+asyncpg://x/y", app_role="app'; DROP TABLE users; --")
    assert DatabaseConfig(url="postgresql+asyncpg://x/y", app_role="ferrule_app").app_role
