"""WatchPredictions: a tail of new matching predictions in commit order, resumable from a
signed cursor with nothing missed or repeated; tenant-scoped; a slow consumer ends with
the cursor to resume from instead of growing the server's memory. On PostgreSQL,
MariaDB and SQLite (any_server); across processes and kills in test_watch_processes.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import grpc
import pytest

from db.engine import Database
from db.models import RiskLevel
from db.repositories.predictions import PredictionsRepository, PredictionValues
from db.tenancy import Tenant
from ferrule.client import AsyncFerruleClient, InvalidArgument, PermissionDenied, ResourceExhausted
from ferrule.v1 import prediction_service_pb2 as pb
from tests.server.conftest import RunningServer, StartServer, make_token
from tests.server.test_analysis_service import _org
from tests.server.test_prediction_service import batch_create, prediction

T = TypeVar("T")
#: A bound on a hang, not a latency figure.
WAIT_S = 30.0
HIGH = pb.PredictionFilter(risk_level=pb.RISK_LEVEL_HIGH)


async def next_of(stream: grpc.aio.UnaryStreamCall[Any, T]) -> T:
    message = await asyncio.wait_for(stream.read(), WAIT_S)
    assert message is not grpc.aio.EOF, "the stream ended early"
    return cast(T, message)


def watch(
    client: AsyncFerruleClient,
    parent: str,
    flt: pb.PredictionFilter | None = None,
    cursor: str = "",
) -> grpc.aio.UnaryStreamCall[pb.WatchPredictionsRequest, pb.WatchPredictionsResponse]:
    request = pb.WatchPredictionsRequest(parent=parent, filter=flt, cursor=cursor)
    return client.predictions.WatchPredictions(request, timeout=120)


async def opened(
    stream: grpc.aio.UnaryStreamCall[Any, pb.WatchPredictionsResponse],
) -> str:
    """The first response: no rows, the starting cursor (the watch is established)."""
    first = await next_of(stream)
    assert not first.predictions and first.cursor
    return first.cursor


async def collect(
    stream: grpc.aio.UnaryStreamCall[Any, pb.WatchPredictionsResponse], count: int
) -> tuple[list[pb.Prediction], str]:
    """Read until ``count`` predictions arrived; they and the last cursor."""
    got: list[pb.Prediction] = []
    cursor = ""
    while len(got) < count:
        response = await next_of(stream)
        got += response.predictions
        cursor = response.cursor
    assert len(got) == count, [p.name for p in got]
    return got, cursor


def mixed(count: int, tag: str) -> list[pb.Prediction]:
    """Alternately HIGH and LOW."""
    return [
        prediction(
            0.9 if i % 2 == 0 else 0.1,
            subject=f"{tag}-{i}",
            risk=pb.RISK_LEVEL_HIGH if i % 2 == 0 else pb.RISK_LEVEL_LOW,
        )
        for i in range(count)
    ]


def high_names(created: list[pb.Prediction]) -> list[str]:
    return sorted(p.name for p in created if p.risk_level == pb.RISK_LEVEL_HIGH)


async def test_a_watch_tails_new_matching_predictions_in_commit_order(
    any_server: RunningServer,
) -> None:
    org = await _org(any_server)
    await batch_create(org.client, org.parent, mixed(6, "before"))  # not new: never sent
    stream = watch(org.client, org.parent, HIGH)
    await opened(stream)
    first = await batch_create(org.client, org.parent, mixed(10, "first"))
    single = await org.client.predictions.CreatePrediction(
        pb.CreatePredictionRequest(
            parent=org.parent, prediction=prediction(0.95, risk=pb.RISK_LEVEL_HIGH)
        )
    )
    await org.client.predictions.CreatePrediction(
        pb.CreatePredictionRequest(parent=org.parent, prediction=prediction(0.2))
    )
    got, _ = await collect(stream, 6)
    # One transaction's rows arrive together (in id order), before a later commit's.
    assert sorted(p.name for p in got[:5]) == high_names(first)
    assert got[5].name == single.name
    assert {p.risk_level for p in got} == {pb.RISK_LEVEL_HIGH}
    stream.cancel()


async def test_resuming_from_a_cursor_misses_and_repeats_nothing(
    any_server: RunningServer,
) -> None:
    org = await _org(any_server)
    stream = watch(org.client, org.parent, HIGH)
    start = await opened(stream)
    first = await batch_create(org.client, org.parent, mixed(8, "a"))
    _, cursor = await collect(stream, 4)
    stream.cancel()
    # Written while nobody watches.
    second = await batch_create(org.client, org.parent, mixed(8, "b"))
    resumed = watch(org.client, org.parent, HIGH, cursor)
    assert await opened(resumed)
    third = await batch_create(org.client, org.parent, mixed(4, "c"))
    got, _ = await collect(resumed, 6)
    assert sorted(p.name for p in got) == sorted(high_names(second) + high_names(third))
    resumed.cancel()
    # From the very first cursor: everything since, once.
    again = watch(org.client, org.parent, HIGH, start)
    await opened(again)
    got, _ = await collect(again, 10)
    expected = high_names(first) + high_names(second) + high_names(third)
    assert sorted(p.name for p in got) == sorted(expected)
    again.cancel()


async def test_bad_cursors_are_invalid_arguments_and_other_tenants_refused(
    any_server: RunningServer,
) -> None:
    org = await _org(any_server)
    other = await _org(any_server)
    theirs = watch(other.client, other.parent, HIGH)
    their_cursor = await opened(theirs)
    theirs.cancel()
    mine = watch(org.client, org.parent, HIGH)
    my_cursor = await opened(mine)
    mine.cancel()
    for cursor, flt in [
        ("garbage", HIGH),
        (my_cursor[:-2] + ("AA" if not my_cursor.endswith("AA") else "BB"), HIGH),
        (their_cursor, HIGH),  # another organization's
        (my_cursor, pb.PredictionFilter(risk_level=pb.RISK_LEVEL_LOW)),  # another filter
    ]:
        with pytest.raises(InvalidArgument) as caught:
            await next_of(watch(org.client, org.parent, flt, cursor))
        assert dict(caught.value.field_violations).keys() == {"cursor"}
    with pytest.raises(PermissionDenied):
        await next_of(watch(org.client, other.parent, HIGH))
    with pytest.raises(InvalidArgument):
        await next_of(watch(org.client, org.parent, pb.PredictionFilter(min_probability=2.0)))


async def test_watches_of_two_tenants_never_cross(any_server: RunningServer) -> None:
    orgs = [await _org(any_server, subject=f"svc-{i}") for i in range(2)]
    streams = {o.id: watch(o.client, o.parent) for o in orgs}
    for o in orgs:
        await opened(streams[o.id])
    created = {o.id: await batch_create(o.client, o.parent, mixed(20, str(o.id))) for o in orgs}
    for o in orgs:
        got, _ = await collect(streams[o.id], 20)
        assert sorted(p.name for p in got) == sorted(p.name for p in created[o.id])
        assert all(p.name.startswith(o.parent + "/") for p in got)
        streams[o.id].cancel()


async def test_a_slow_consumer_ends_with_the_cursor_and_resumes_exactly_once(
    start_server: StartServer, database_url: str
) -> None:
    """A caller that stops reading while 3,000 rows commit: the server reads at most the
    backlog bound ahead of what it sent (flow control stops its sends), then ends the
    stream with RESOURCE_EXHAUSTED carrying the cursor; resuming from it yields the rest,
    each row once."""
    server = await start_server(database_url, ferrule_watch_backlog_rows=200)
    org = await _org(server)
    # No BDP probing: the HTTP/2 window stays small while the client reads nothing.
    slow = server.client(make_token(org.id), options=(("grpc.http2.bdp_probe", 0),))
    stream = watch(slow, org.parent)
    await opened(stream)
    # Rows of 4 KiB: far more than the transport buffers between the two ends.
    flood = mixed(3000, "flood")
    for row in flood:
        row.features.update({"padding": "x" * 4096})
    created = await batch_create(org.client, org.parent, flood)
    received: list[pb.Prediction] = []

    async def read_until_the_error() -> None:
        while True:
            received.extend((await next_of(stream)).predictions)

    with pytest.raises(ResourceExhausted) as caught:
        await read_until_the_error()
    error = caught.value
    assert error.reason == "WATCH_BACKLOG_EXCEEDED"
    cursor = error.metadata["cursor"]
    assert 0 < len(received) < len(created)
    resumed = watch(org.client, org.parent, cursor=cursor)
    await opened(resumed)
    rest, _ = await collect(resumed, len(created) - len(received))
    names = [p.name for p in received + rest]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(p.name for p in created)
    resumed.cancel()


async def test_a_row_committed_behind_a_later_one_is_still_delivered_once(
    start_server: StartServer, pg_database_url: str
) -> None:
    """PostgreSQL: transaction A writes first (a lower transaction id) and commits after
    B. The watcher delivers neither before A ends, then A's row and B's, in that order;
    a watch that started between B's commit and A's gets A's row (and not B's, which
    committed before it started), also after resuming from its first cursor."""
    server = await start_server(pg_database_url)
    org = await _org(server)
    stream = watch(org.client, org.parent)
    await opened(stream)
    database = Database.from_url(pg_database_url)
    tenant = Tenant.of(org.id)
    row_a = PredictionValues(
        id=uuid.uuid4(),
        organization_id=org.id,
        subject_id="written-first",
        probability=0.5,
        risk_level=RiskLevel.MEDIUM,
        model_name="m",
        model_version="v",
        features=None,
        predict_time=datetime.now(UTC),
        request_id=None,
        create_time=datetime.now(UTC),
        create_by="test",
    )
    try:
        async with database.transaction(tenant) as session:
            await PredictionsRepository(session, tenant).insert_many([row_a])
            (row_b,) = await batch_create(org.client, org.parent, [prediction(0.4)])
            between = watch(org.client, org.parent)
            between_cursor = await opened(between)
            between.cancel()
        got, _ = await collect(stream, 2)
    finally:
        await database.dispose()
    assert [p.name for p in got] == [f"{org.parent}/predictions/{row_a.id}", row_b.name]
    resumed = watch(org.client, org.parent, cursor=between_cursor)
    await opened(resumed)
    # B committed before that watch began: not new to it. A committed after: new.
    (again,), _ = await collect(resumed, 1)
    assert again.name == got[0].name
    stream.cancel()
    resumed.cancel()


async def test_rows_ingested_by_stream_predictions_reach_the_tail_once(
    any_server: RunningServer,
) -> None:
    """StreamPredictions' group commits (COPY and INSERT ... SELECT on PostgreSQL, INSERT
    IGNORE on MariaDB) take the commit order and wake the tail like the unary writes; a
    re-sent batch adds nothing."""
    org = await _org(any_server)
    stream = watch(org.client, org.parent)
    await opened(stream)
    batches = [
        pb.StreamPredictionsRequest(
            parent=org.parent, batch_id=f"b{b}", predictions=mixed(50, f"stream-{b}")
        )
        for b in range(4)
    ]

    async def send(requests: list[pb.StreamPredictionsRequest]) -> int:
        async def source() -> AsyncIterator[pb.StreamPredictionsRequest]:
            for item in requests:
                yield item

        acks = org.client.predictions.StreamPredictions(source(), timeout=WAIT_S)
        return sum([ack.accepted async for ack in acks])

    assert await send(batches) == 200
    assert await send(batches[:1]) == 0  # re-sent: nothing new
    got, _ = await collect(stream, 200)
    subjects = [p.subject_id for p in got]
    assert len(set(subjects)) == 200
    assert set(subjects) == {p.subject_id for b in batches for p in b.predictions}
    stream.cancel()
