"""StreamPredictions end to end (in-process server, real database, the published client).

Per-batch counts, idempotent re-sends, protocol errors, and the client helper resuming
after the server went away. The process-kill tests (acks after commit, memory bound) are
in test_prediction_stream_process.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from sqlalchemy import RowMapping, select
from sqlalchemy.pool import NullPool

from db.engine_factory import async_engine
from db.models import Prediction
from ferrule.client import AsyncFerruleClient, InvalidArgument, PermissionDenied
from ferrule.client.ingest import AsyncPredictionStreamer
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1 import user_service_pb2 as user_pb
from server.app import FerruleApp
from tests.conftest import query
from tests.polling import eventually
from tests.server.conftest import RunningServer, StartServer, server_settings

pytestmark = pytest.mark.timeout(60)


async def new_org(server: RunningServer) -> uuid.UUID:
    org = await server.admin().users.CreateOrganization(
        user_pb.CreateOrganizationRequest(organization=user_pb.Organization(display_name="Ingest"))
    )
    return uuid.UUID(org.name.removeprefix("organizations/"))


def row(i: int, **fields: Any) -> pb.Prediction:
    message = pb.Prediction(
        subject_id=f"emp-{i}",
        probability=(i % 100) / 100,
        model_name="attrition",
        model_version="v1",
    )
    message.features.update({"tenure_months": i % 120, "dept": "eng", "remote": i % 2 == 0})
    for key, value in fields.items():
        setattr(message, key, value)
    return message


def request(
    parent: str, batch_id: str, rows: Sequence[pb.Prediction]
) -> pb.StreamPredictionsRequest:
    return pb.StreamPredictionsRequest(parent=parent, batch_id=batch_id, predictions=rows)


async def exchange(
    client: AsyncFerruleClient, requests: Sequence[pb.StreamPredictionsRequest]
) -> list[pb.StreamPredictionsResponse]:
    """Send every request on one stream, half-close, return every acknowledgement."""

    async def source() -> AsyncIterator[pb.StreamPredictionsRequest]:
        for item in requests:
            yield item

    return [ack async for ack in client.predictions.StreamPredictions(source(), timeout=30)]


async def stored(database_url: str, org: uuid.UUID) -> list[RowMapping]:
    """The organization's stored predictions, typed by the model (UUIDs, enum values)."""
    statement = (
        select(
            Prediction.id,
            Prediction.subject_id,
            Prediction.probability,
            Prediction.request_id,
            Prediction.risk_level,
            Prediction.features,
            Prediction.create_by,
        )
        .where(Prediction.organization_id == org)
        .order_by(Prediction.id)
    )
    engine = async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(statement)).mappings().all())
    finally:
        await engine.dispose()


def digest(ids: Sequence[uuid.UUID]) -> str:
    return hashlib.md5("".join(sorted(str(i) for i in ids)).encode()).hexdigest()


async def test_mixed_rows_give_exact_per_batch_counts(db_server: RunningServer) -> None:
    org = await new_org(db_server)
    parent = f"organizations/{org}"
    client = db_server.for_org(org, subject="svc-ingest")
    first = [row(0), row(1, probability=1.5), row(2), row(3, subject_id=""), row(4)]
    second = [
        row(10),
        row(11, model_version=""),
        row(12, name=f"{parent}/predictions/not-a-uuid"),
        row(13, name=f"{parent}/predictions/{uuid.uuid4()}"),
    ]
    acks = await exchange(
        client,
        [request(parent, "b-1", first), request("", "b-empty", []), request(parent, "b-2", second)],
    )

    assert [a.batch_id for a in acks] == ["b-1", "b-empty", "b-2"]
    assert [(a.accepted, a.duplicates) for a in acks] == [(3, 0), (0, 0), (2, 0)]
    assert [(r.index, [v.field for v in r.violations]) for r in acks[0].rejected] == [
        (1, ["probability"]),
        (3, ["subject_id"]),
    ]
    assert acks[0].rejected[0].violations[0].reason == "OUT_OF_RANGE"
    assert [(r.index, [v.field for v in r.violations]) for r in acks[2].rejected] == [
        (1, ["model_version"]),
        (2, ["name"]),
    ]
    rows = await stored(db_server.database_url, org)
    assert sorted(r["subject_id"] for r in rows) == ["emp-0", "emp-10", "emp-13", "emp-2", "emp-4"]
    by_subject = {r["subject_id"]: r for r in rows}
    expected_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{parent}/streamBatches/b-1/2")
    assert by_subject["emp-2"]["id"] == expected_id
    assert by_subject["emp-2"]["request_id"] == "b-1"
    assert by_subject["emp-2"]["create_by"] == "svc-ingest"
    assert by_subject["emp-13"]["id"] == uuid.UUID(second[3].name.rsplit("/", 1)[1])
    assert by_subject["emp-4"]["risk_level"] == "LOW"  # derived from probability 0.04


async def test_resent_batches_and_reused_ids_write_nothing(db_server: RunningServer) -> None:
    org = await new_org(db_server)
    parent = f"organizations/{org}"
    client = db_server.for_org(org)
    chosen = f"{parent}/predictions/{uuid.uuid4()}"
    batches = [
        request(parent, "r-1", [row(i) for i in range(50)]),
        request(parent, "r-2", [row(100, name=chosen), row(101, probability=-1), row(102)]),
    ]
    first = await exchange(client, batches)
    assert [(a.accepted, a.duplicates, len(a.rejected)) for a in first] == [(50, 0, 0), (2, 0, 1)]
    before = await stored(db_server.database_url, org)

    # The same batches again, on a new stream, and again twice within one stream.
    again = await exchange(client, batches + batches)
    assert [(a.accepted, a.duplicates, len(a.rejected)) for a in again] == [
        (0, 50, 0),
        (0, 2, 1),
    ] * 2
    # A new batch re-using a client id, and repeating one id inside the batch.
    fresh = f"{parent}/predictions/{uuid.uuid4()}"
    rows = [row(200, name=chosen), row(201, name=fresh), row(202, name=fresh)]
    reused = await exchange(client, [request(parent, "r-3", rows)])
    assert [(a.accepted, a.duplicates) for a in reused] == [(1, 2)]
    after = await stored(db_server.database_url, org)
    assert len(after) == len(before) + 1
    assert digest([r["id"] for r in before]) == digest(
        [r["id"] for r in after if r["id"] != uuid.UUID(fresh.rsplit("/", 1)[1])]
    )

    recorded = await query(
        db_server.database_url,
        "SELECT batch_id, accepted, duplicates, rejected FROM ingest_batches"
        " WHERE organization_id = :org ORDER BY batch_id",
        org=org,
    )
    assert [tuple(r) for r in recorded] == [("r-1", 50, 0, 0), ("r-2", 2, 0, 1), ("r-3", 1, 2, 0)]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda parent: request(parent, "", [row(0)]), "batch_id"),
        (lambda parent: request(parent, "has space", [row(0)]), "batch_id"),
        (lambda parent: request(parent, "x" * 129, [row(0)]), "batch_id"),
        (lambda parent: request(parent, "big", [row(i) for i in range(1001)]), "predictions"),
        (lambda parent: request(f"organizations/{uuid.uuid4()}", "moved", [row(0)]), "parent"),
    ],
)
async def test_protocol_errors_end_the_stream_after_earlier_acks(
    db_server: RunningServer, make: Any, field: str
) -> None:
    org = await new_org(db_server)
    parent = f"organizations/{org}"
    client = db_server.for_org(org)
    acks: list[pb.StreamPredictionsResponse] = []

    async def source() -> AsyncIterator[pb.StreamPredictionsRequest]:
        yield request(parent, "ok-1", [row(0)])
        yield make(parent)

    async def drain() -> None:
        async for ack in client.predictions.StreamPredictions(source(), timeout=30):
            acks.append(ack)

    with pytest.raises(InvalidArgument) as raised:
        await drain()
    assert [(a.batch_id, a.accepted) for a in acks] == [("ok-1", 1)]
    assert [f for f, _ in raised.value.field_violations] == [field]
    assert len(await stored(db_server.database_url, org)) == 1


async def test_first_message_needs_a_parent_the_caller_may_write(db_server: RunningServer) -> None:
    org, other = await new_org(db_server), await new_org(db_server)
    client = db_server.for_org(org)
    with pytest.raises(InvalidArgument):
        await exchange(client, [request("", "b", [row(0)])])
    with pytest.raises(PermissionDenied):
        await exchange(client, [request(f"organizations/{other}", "b", [row(0)])])
    assert await stored(db_server.database_url, other) == []


async def test_helper_totals_and_rejected_rows(db_server: RunningServer) -> None:
    org = await new_org(db_server)
    parent = f"organizations/{org}"
    client = db_server.for_org(org)
    acked: list[str] = []
    async with AsyncPredictionStreamer(
        client, parent, batch_size=7, max_in_flight=3, on_ack=lambda a: acked.append(a.batch_id)
    ) as streamer:
        for i in range(100):
            await streamer.add(row(i, probability=2.0) if i in (5, 64) else row(i))
        totals = await streamer.flush()
        assert streamer.unacknowledged == 0
    assert (totals.accepted, totals.duplicates, totals.batches) == (98, 0, 15)
    assert [(r.row_number, r.index, r.violations[0][0]) for r in totals.rejected] == [
        (5, 5, "probability"),
        (64, 1, "probability"),
    ]
    assert len(acked) == 15
    assert len(await stored(db_server.database_url, org)) == 98


async def test_helper_resumes_after_the_server_restarts(
    server_database_url: str, start_server: StartServer
) -> None:
    """Stop the server mid-stream, start another on the same port: every row once."""
    first = await start_server(server_database_url)
    org = await new_org(first)
    parent = f"organizations/{org}"
    port = int(first.target.rsplit(":", 1)[1])
    client = first.for_org(org)
    total = 6000
    restarted: list[FerruleApp] = []

    streamer = AsyncPredictionStreamer(
        client, parent, batch_size=100, max_in_flight=8, initial_backoff=0.05
    )

    async def produce() -> None:
        for i in range(total):
            await streamer.add(row(i))
            if i == total // 3:
                await first.app.stop(grace=0)
                app = FerruleApp(
                    server_settings(server_database_url, ferrule_listen=f"127.0.0.1:{port}")
                )
                await app.start()
                restarted.append(app)
        await streamer.close()

    try:
        await asyncio.wait_for(produce(), timeout=45)
    finally:
        for app in restarted:
            await app.stop(grace=0.5)

    totals = streamer.totals
    assert totals.reconnects >= 1
    assert totals.accepted + totals.duplicates == total and not totals.rejected
    rows = await stored(server_database_url, org)
    assert len(rows) == total
    assert sorted(r["subject_id"] for r in rows) == sorted(f"emp-{i}" for i in range(total))
    assert sum(r["probability"] for r in rows) == pytest.approx(
        sum((i % 100) / 100 for i in range(total))
    )


async def test_stream_under_the_application_role(
    start_server: StartServer, pg_database_url: str
) -> None:
    """Row-level security on: the staging table belongs to the role, the insert passes
    the tenant policy, and a server without the role on the same database coexists."""
    server = await start_server(pg_database_url, database_app_role="ferrule_app")
    org = await new_org(server)
    parent = f"organizations/{org}"
    acks = await exchange(
        server.for_org(org),
        [request(parent, f"a-{n}", [row(i) for i in range(n * 10, n * 10 + 10)]) for n in range(3)],
    )
    assert [(a.accepted, a.duplicates) for a in acks] == [(10, 0)] * 3
    plain = await start_server(pg_database_url, migrate=False)
    again = await exchange(
        plain.for_org(org), [request(parent, "a-0", [row(0)]), request(parent, "a-9", [row(1)])]
    )
    assert [(a.accepted, a.duplicates) for a in again] == [(0, 1), (1, 0)]
    assert len(await stored(pg_database_url, org)) == 31


async def test_stream_on_sqlite(start_server: StartServer, sqlite_database_url: str) -> None:
    server = await start_server(sqlite_database_url)
    org = await new_org(server)
    parent = f"organizations/{org}"
    client = server.for_org(org)
    batches = [
        request(parent, "s-1", [row(0), row(1, probability=float("nan")), row(2)]),
        request(parent, "s-2", [row(3, name=f"{parent}/predictions/{uuid.uuid4()}")]),
    ]
    acks = await exchange(client, batches)
    assert [(a.accepted, a.duplicates, len(a.rejected)) for a in acks] == [(2, 0, 1), (1, 0, 0)]
    assert [(a.accepted, a.duplicates) for a in await exchange(client, batches)] == [(0, 2), (0, 1)]
    listed = await client.predictions.ListPredictions(pb.ListPredictionsRequest(parent=parent))
    assert listed.total_size == 3
    assert {p.request_id for p in listed.predictions} == {"s-1", "s-2"}


async def test_cancelled_stream_releases_the_ingest_budget(pg_server: RunningServer) -> None:
    from server.services.prediction_stream import (
        MAX_BUFFERED_BYTES,
        MAX_BUFFERED_ROWS,
        ingest_budget,
    )

    org = await new_org(pg_server)
    parent = f"organizations/{org}"
    client = pg_server.for_org(org)
    call = client.predictions.StreamPredictions(timeout=30)
    for n in range(4):
        await call.write(request(parent, f"c-{n}", [row(i) for i in range(500)]))
    await call.read()
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call.read()
    budget = ingest_budget()
    await eventually(  # the handler notices the cancellation asynchronously
        lambda: (
            (budget.available_rows, budget.available_bytes)
            == (MAX_BUFFERED_ROWS, MAX_BUFFERED_BYTES)
        ),
        what="the cancelled stream returning the budget",
    )
