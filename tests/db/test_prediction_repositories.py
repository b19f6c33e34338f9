"""Predictions and request-log repositories on PostgreSQL (under RLS) and SQLite."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from db.engine import Database
from db.errors import ValidationError
from db.models import Organization, RequestLogEntry, RiskLevel, new_id
from db.repositories.predictions import (
    PredictionFilter,
    PredictionsRepository,
    PredictionValues,
    export_chunks,
    purge_older_than,
)
from db.repositories.request_log import (
    INSERT_CHUNK_ROWS,
    LoggedCall,
    RequestLogFilter,
    RequestLogRepository,
    insert_request_log,
)
from db.tenancy import Tenant

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(
    organization: Organization,
    *,
    probability: float = 0.5,
    risk: RiskLevel = RiskLevel.MEDIUM,
    subject: str = "emp-1",
    model: str = "attrition",
    version: str = "v1",
    at: datetime = T0,
    prediction_id: uuid.UUID | None = None,
) -> PredictionValues:
    return PredictionValues(
        id=prediction_id or new_id(),
        organization_id=organization.id,
        subject_id=subject,
        probability=probability,
        risk_level=risk,
        model_name=model,
        model_version=version,
        features={"age": 41, "dept": "sales"},
        predict_time=at,
        request_id="req-1",
        create_time=datetime.now(UTC),
        create_by="tester",
    )


async def insert(
    database: Database, tenant: Tenant, rows: list[PredictionValues]
) -> set[uuid.UUID]:
    async with database.transaction(tenant) as session:
        return await PredictionsRepository(session, tenant).insert_many(rows)


async def test_insert_many_skips_existing_and_repeated_ids(
    database: Database, org_a: Organization, tenant_a: Tenant
) -> None:
    first = [row(org_a) for _ in range(3)]
    assert await insert(database, tenant_a, first) == {r.id for r in first}
    again = row(org_a, prediction_id=first[0].id, subject="other")
    fresh = row(org_a)
    repeated = row(org_a, prediction_id=fresh.id, subject="second copy")
    assert await insert(database, tenant_a, [again, fresh, repeated]) == {fresh.id}
    async with database.transaction(tenant_a, read_only=True) as session:
        repo = PredictionsRepository(session, tenant_a)
        assert (await repo.get(first[0].id)).subject_id == "emp-1"  # first write wins
        stored = await repo.get(fresh.id)
        assert stored.subject_id == "emp-1"
        assert stored.features == {"age": 41, "dept": "sales"}
        assert stored.risk_level is RiskLevel.MEDIUM
        assert stored.predict_time == T0
        page = await repo.list(include_total=True)
        assert page.total_size == 4


async def test_insert_many_in_large_batches(
    database: Database, org_a: Organization, tenant_a: Tenant
) -> None:
    rows = [row(org_a, at=T0 + timedelta(seconds=i)) for i in range(2500)]
    assert len(await insert(database, tenant_a, rows)) == 2500


async def test_rows_of_another_tenant_are_invisible(
    database: Database,
    org_a: Organization,
    tenant_a: Tenant,
    tenant_b: Tenant,
) -> None:
    mine = row(org_a)
    await insert(database, tenant_a, [mine])
    async with database.transaction(tenant_b, read_only=True) as session:
        repo = PredictionsRepository(session, tenant_b)
        with pytest.raises(Exception, match="not found"):
            await repo.get(mine.id)
        assert (await repo.list(include_total=True)).total_size == 0
        assert (await repo.risk_distribution()).total == 0
    with pytest.raises(Exception, match="another organization"):
        await insert(database, tenant_b, [row(org_a)])


async def test_list_filters_order_and_keyset_walk(
    database: Database, org_a: Organization, tenant_a: Tenant
) -> None:
    rows = [
        row(
            org_a,
            probability=i / 20,
            risk=(RiskLevel.LOW, RiskLevel.MEDIUM, RiskLevel.HIGH)[i % 3],
            subject=f"emp-{i % 4}",
            version=f"v{i % 2}",
            at=T0 + timedelta(minutes=i // 2),  # pairs share a predict_time: ties by id
        )
        for i in range(20)
    ]
    await insert(database, tenant_a, rows)
    by_id = {r.id: r for r in rows}
    async with database.transaction(tenant_a, read_only=True) as session:
        repo = PredictionsRepository(session, tenant_a)
        seen: list[uuid.UUID] = []
        cursor = None
        for _ in range(10):
            page = await repo.list(page_size=3, cursor=cursor)
            seen += [p.id for p in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == sorted(by_id)
        times = [by_id[i].predict_time for i in seen]
        assert times == sorted(times, reverse=True)

        page = await repo.list(order_by="probability desc", page_size=5)
        assert [p.probability for p in page.items] == [0.95, 0.9, 0.85, 0.8, 0.75]

        flt = PredictionFilter(
            subject_id="emp-1",
            model_version="v1",
            min_probability=0.2,
            start_time=T0 + timedelta(minutes=1),
            end_time=T0 + timedelta(minutes=9),
        )
        page = await repo.list(flt, order_by="predict_time", include_total=True)
        expected = [
            r.id
            for r in sorted(rows, key=lambda r: (r.predict_time, r.id))
            if r.subject_id == "emp-1"
            and r.model_version == "v1"
            and r.probability >= 0.2
            and T0 + timedelta(minutes=1) <= r.predict_time < T0 + timedelta(minutes=9)
        ]
        assert expected
        assert [p.id for p in page.items] == expected
        assert page.total_size == len(expected)
        high = await repo.list(PredictionFilter(risk_level=RiskLevel.HIGH), include_total=True)
        assert high.total_size == 6
        with pytest.raises(ValidationError) as caught:
            await repo.list(order_by="subject_id")
        assert caught.value.violations[0].field == "order_by"


async def test_risk_distribution_and_statistics(
    database: Database, org_a: Organization, tenant_a: Tenant
) -> None:
    await insert(
        database,
        tenant_a,
        [
            row(org_a, probability=0.1, risk=RiskLevel.LOW, version="v1"),
            row(org_a, probability=0.2, risk=RiskLevel.LOW, version="v1"),
            row(org_a, probability=0.5, risk=RiskLevel.MEDIUM, version="v2"),
            row(org_a, probability=0.9, risk=RiskLevel.HIGH, version="v1"),
        ],
    )
    async with database.transaction(tenant_a, read_only=True) as session:
        repo = PredictionsRepository(session, tenant_a)
        dist = await repo.risk_distribution()
        assert dist.total == 4
        assert dist.by_level == {RiskLevel.LOW: 2, RiskLevel.MEDIUM: 1, RiskLevel.HIGH: 1}
        narrowed = await repo.risk_distribution(PredictionFilter(min_probability=0.3))
        assert narrowed.by_level == {RiskLevel.MEDIUM: 1, RiskLevel.HIGH: 1}

        stats = await repo.statistics()
        assert stats.count == 4
        assert stats.mean_probability == pytest.approx(0.425)
        assert stats.min_probability == pytest.approx(0.1)
        assert stats.max_probability == pytest.approx(0.9)
        assert [(m.model_version, m.count) for m in stats.model_versions] == [("v1", 3), ("v2", 1)]
        assert stats.model_versions[0].mean_probability == pytest.approx(0.4)

        empty = await repo.statistics(PredictionFilter(subject_id="nobody"))
        assert (empty.count, empty.mean_probability, empty.model_versions) == (0, None, [])


async def test_export_returns_every_row_once_in_bounded_chunks(
    database: Database, org_a: Organization, tenant_a: Tenant, org_b: Organization
) -> None:
    rows = [row(org_a, at=T0 + timedelta(seconds=i % 50)) for i in range(1234)]
    await insert(database, tenant_a, rows)
    await insert(database, Tenant.of(org_b.id), [row(org_b)])
    chunks = [
        chunk
        async for chunk in export_chunks(
            lambda: database.transaction(tenant_a, read_only=True), tenant_a, chunk_size=100
        )
    ]
    assert max(len(c) for c in chunks) == 100
    exported = [p.id for chunk in chunks for p in chunk]
    assert len(exported) == len(set(exported)) == 1234
    assert set(exported) == {r.id for r in rows}
    assert database.pool_status().checked_out == 0


async def test_purge_deletes_only_old_rows_in_chunks(
    database: Database,
    org_a: Organization,
    tenant_a: Tenant,
    org_b: Organization,
    tenant_b: Tenant,
) -> None:
    cutoff = T0 + timedelta(days=10)
    old = [row(org_a, at=T0 + timedelta(hours=i)) for i in range(25)]
    young = [row(org_a, at=cutoff + timedelta(hours=i)) for i in range(5)]
    other_old = [row(org_b, at=T0)]
    await insert(database, tenant_a, old + young)
    await insert(database, tenant_b, other_old)

    dry = await purge_older_than(
        lambda: database.transaction(tenant_a), tenant_a, cutoff, chunk_size=10, dry_run=True
    )
    assert dry == 25
    purged = await purge_older_than(
        lambda: database.transaction(tenant_a), tenant_a, cutoff, chunk_size=10
    )
    assert purged == 25
    async with database.transaction(tenant_a, read_only=True) as session:
        left = await PredictionsRepository(session, tenant_a).list(page_size=100)
        assert {p.id for p in left.items} == {r.id for r in young}
    async with database.transaction(tenant_b, read_only=True) as session:
        assert (await PredictionsRepository(session, tenant_b).get(other_old[0].id)) is not None
    everyone = Tenant.all()
    assert await purge_older_than(lambda: database.transaction(everyone), everyone, cutoff) == 1


def entry(
    organization_id: str | None,
    method: str = "/ferrule.v1.PredictionService/GetPrediction",
    **kw: object,
) -> LoggedCall:
    values: dict[str, object] = {
        "method": method,
        "caller": "svc",
        "organization_id": organization_id,
        "peer": "ipv4:127.0.0.1:5000",
        "user_agent": "grpc-python/1.85",
        "status_code": "OK",
        "latency_ms": 1.5,
        "request_bytes": 42,
        "trace_id": None,
        "create_time": T0,
    }
    values.update(kw)
    return LoggedCall(**values)  # type: ignore[arg-type]


async def test_request_log_insert_and_list(
    database: Database, org_a: Organization, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    org = str(org_a.id)
    await insert_request_log(
        database,
        [
            entry(org, create_time=T0 + timedelta(seconds=1)),
            entry(org, status_code="NOT_FOUND", create_time=T0 + timedelta(seconds=2)),
            entry(
                org, method="/ferrule.v1.UserService/GetUser", create_time=T0 + timedelta(seconds=3)
            ),
            entry(None, status_code="UNAUTHENTICATED"),
            entry(str(uuid.uuid4())),  # names no organization: kept, without one
            entry("not-a-uuid", user_agent="x" * 2000),
        ],
    )
    await insert_request_log(database, [])
    async with database.transaction(tenant_a, read_only=True) as session:
        repo = RequestLogRepository(session, tenant_a)
        page = await repo.list(include_total=True)
        assert page.total_size == 3
        assert [e.create_time for e in page.items] == [T0 + timedelta(seconds=s) for s in (3, 2, 1)]
        found = await repo.list(RequestLogFilter(status_code="NOT_FOUND"))
        assert [e.status_code for e in found.items] == ["NOT_FOUND"]
        by_method = await repo.list(
            RequestLogFilter(method="/ferrule.v1.UserService/GetUser"), include_total=True
        )
        assert by_method.total_size == 1
        window = await repo.list(
            RequestLogFilter(
                start_time=T0 + timedelta(seconds=1), end_time=T0 + timedelta(seconds=3)
            ),
            order_by="create_time",
            page_size=1,
        )
        assert window.items[0].create_time == T0 + timedelta(seconds=1)
        assert window.next_cursor is not None
        rest = await repo.list(
            RequestLogFilter(
                start_time=T0 + timedelta(seconds=1), end_time=T0 + timedelta(seconds=3)
            ),
            order_by="create_time",
            page_size=1,
            cursor=window.next_cursor,
        )
        assert rest.items[0].create_time == T0 + timedelta(seconds=2)
        assert rest.next_cursor is None
    async with database.transaction(tenant_b, read_only=True) as session:
        assert (
            await RequestLogRepository(session, tenant_b).list(include_total=True)
        ).total_size == 0
    everyone = Tenant.all()
    async with database.transaction(everyone, read_only=True) as session:
        page = await RequestLogRepository(session, everyone).list(page_size=100)
        assert len(page.items) == 6
        assert sum(e.organization_id is None for e in page.items) == 3
        assert max(len(e.user_agent or "") for e in page.items) == 512


async def test_request_log_refuses_a_naive_create_time_and_writes_none_of_its_batch(
    database: Database, org_a: Organization
) -> None:
    """A naive timestamp is ambiguous on every backend (PostgreSQL's rows bypass the
    column type that refuses it elsewhere), and the batch holding it is not half-written."""
    naive = entry(str(org_a.id), create_time=datetime(2026, 1, 1, 12, 0))
    with pytest.raises(ValueError, match="naive"):
        await insert_request_log(database, [entry(str(org_a.id)), naive])
    async with database.transaction(Tenant.all(), read_only=True) as session:
        assert (await session.execute(select(RequestLogEntry))).first() is None


async def test_request_log_batch_of_several_chunks_keeps_each_entry_whole(
    database: Database, org_a: Organization, org_b: Organization
) -> None:
    """Entries of a batch longer than a chunk each keep their own values, with organization
    ids that name no organization (or none at all) stored as NULL, in every chunk."""
    organizations: list[str | None] = [
        str(org_a.id),
        str(org_b.id),
        str(uuid.uuid4()),  # names no organization
        "not-a-uuid",
        None,
    ]
    count = 2 * INSERT_CHUNK_ROWS + 3
    entries = [
        entry(
            organizations[i % len(organizations)],
            method=f"/ferrule.v1.UserService/M{i}",
            caller=None if i % 2 else f"svc-{i}",
            user_agent=None if i % 3 else "agent",
            request_bytes=None if i % 7 == 0 else i,
            latency_ms=float(i),
            create_time=T0 + timedelta(microseconds=i),
        )
        for i in range(count)
    ]
    await insert_request_log(database, entries)
    async with database.transaction(Tenant.all(), read_only=True) as session:
        stored = {
            stored.method: stored
            for stored in (await session.execute(select(RequestLogEntry))).scalars()
        }
    assert len(stored) == count
    expected_org = {str(org_a.id): org_a.id, str(org_b.id): org_b.id}
    for i, sent in enumerate(entries):
        got = stored[sent.method]
        assert got.organization_id == expected_org.get(str(sent.organization_id))
        assert (got.caller, got.user_agent, got.request_bytes, got.latency_ms) == (
            sent.caller,
            sent.user_agent,
            sent.request_bytes,
            float(i),
        )
        assert got.create_time == sent.create_time
