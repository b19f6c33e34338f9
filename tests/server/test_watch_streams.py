"""WatchAnalysis and WatchBatch: the state now, again after each committed change, and
the end once the resource is final; on every backend (PostgreSQL through NOTIFY, MariaDB
and SQLite in process), tenant-scoped, bounded per caller."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, TypeVar, cast

import grpc
import pytest
from google.protobuf import field_mask_pb2

from db.change_feed import RedisChangeFeed
from ferrule.client import NotFound, PermissionDenied, ResourceExhausted
from ferrule.v1 import analysis_service_pb2 as pb
from tests.server.conftest import RunningServer, StartServer, make_token
from tests.server.test_analysis_service import Org, _org, create, set_state

T = TypeVar("T")
#: Generous: a bound on a hang, not a latency figure (that is `make bench`'s).
WAIT_S = 30.0


async def next_of(stream: grpc.aio.UnaryStreamCall[Any, T]) -> T:
    message = await asyncio.wait_for(stream.read(), WAIT_S)
    assert message is not grpc.aio.EOF, "the stream ended early"
    return cast(T, message)


async def rest_of(stream: grpc.aio.UnaryStreamCall[Any, T], bound: float = WAIT_S) -> list[T]:
    async def drain() -> list[T]:
        return [item async for item in stream]

    return await asyncio.wait_for(drain(), bound)


async def finish(org: Org, name: str, state: int) -> pb.Analysis:
    await set_state(org, name, pb.ANALYSIS_STATE_PROCESSING)
    return await set_state(org, name, state)


async def test_watch_analysis_sends_each_state_and_ends_when_terminal(
    any_server: RunningServer,
) -> None:
    org = await _org(any_server)
    created = await create(org, f"watched {uuid.uuid4()}")
    stream = org.client.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=created.name))
    first = await next_of(stream)
    assert (first.name, first.state) == (created.name, pb.ANALYSIS_STATE_PENDING)

    await set_state(org, created.name, pb.ANALYSIS_STATE_PROCESSING)
    assert (await next_of(stream)).state == pb.ANALYSIS_STATE_PROCESSING
    done = await set_state(org, created.name, pb.ANALYSIS_STATE_COMPLETED, sentiment_score=0.5)
    rest = await rest_of(stream)  # ends by itself: COMPLETED is final
    assert [a.state for a in rest] == [pb.ANALYSIS_STATE_COMPLETED]
    assert rest[-1].etag == done.etag


async def test_watch_of_a_terminal_analysis_sends_it_once_and_ends(
    any_server: RunningServer,
) -> None:
    org = await _org(any_server)
    created = await create(org, f"failed {uuid.uuid4()}")
    await set_state(org, created.name, pb.ANALYSIS_STATE_FAILED, error_message="boom")
    stream = org.client.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=created.name))
    assert [a.state for a in await rest_of(stream)] == [pb.ANALYSIS_STATE_FAILED]


async def test_watch_batch_follows_progress_and_ends_when_the_last_member_is_terminal(
    any_server: RunningServer,
) -> None:
    org = await _org(any_server)
    batch = await org.client.analyses.CreateBatch(
        pb.CreateBatchRequest(parent=org.parent, batch=pb.AnalysisBatch(display_name="b"))
    )
    members = [await create(org, f"m{i} {uuid.uuid4()}", batch=batch.name) for i in range(3)]
    stream = org.client.analyses.WatchBatch(pb.WatchBatchRequest(name=batch.name))
    first = await next_of(stream)
    assert (first.progress.total_count, first.progress.pending_count) == (3, 3)

    await set_state(org, members[0].name, pb.ANALYSIS_STATE_PROCESSING)
    await set_state(org, members[0].name, pb.ANALYSIS_STATE_COMPLETED)
    await finish(org, members[1].name, pb.ANALYSIS_STATE_FAILED)
    # Level-triggered: states may coalesce, but completed counts never go backwards and
    # the stream is still open while a member is pending.
    seen = await next_of(stream)
    while seen.progress.completed_count + seen.progress.failed_count < 2:
        seen = await next_of(stream)
    assert seen.state == pb.BATCH_STATE_PROCESSING

    await finish(org, members[2].name, pb.ANALYSIS_STATE_COMPLETED)
    rest = await rest_of(stream)
    assert rest, "the final state is always sent"
    final = rest[-1]
    assert final.state == pb.BATCH_STATE_COMPLETED_WITH_FAILURES
    assert (final.progress.completed_count, final.progress.failed_count) == (2, 1)


async def test_watch_needs_the_organization_and_an_existing_resource(
    any_server: RunningServer,
) -> None:
    org = await _org(any_server)
    other = await _org(any_server)
    mine = await create(org, f"mine {uuid.uuid4()}")
    with pytest.raises(PermissionDenied):
        await rest_of(other.client.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=mine.name)))
    with pytest.raises(NotFound):
        await rest_of(
            org.client.analyses.WatchAnalysis(
                pb.WatchAnalysisRequest(name=f"{org.parent}/analyses/{uuid.uuid4()}")
            )
        )


async def test_watches_beyond_the_callers_bound_are_refused(
    start_server: StartServer, sqlite_database_url: str
) -> None:
    server = await start_server(sqlite_database_url, ferrule_max_watches_per_caller=2)
    org = await _org(server)
    created = await create(org, f"bounded {uuid.uuid4()}")
    request = pb.WatchAnalysisRequest(name=created.name)
    held = [org.client.analyses.WatchAnalysis(request) for _ in range(2)]
    for stream in held:
        await next_of(stream)
    with pytest.raises(ResourceExhausted):
        await rest_of(org.client.analyses.WatchAnalysis(request))
    # Another caller of the same organization has its own bound.
    other_caller = server.for_org(org.id, subject="svc-other")
    assert (await next_of(other_caller.analyses.WatchAnalysis(request))).name == created.name
    for stream in held:
        stream.cancel()


async def test_concurrent_watches_of_two_tenants_never_cross(any_server: RunningServer) -> None:
    """100 watches open at once, 50 per tenant (within the default per-caller bound). Each
    tenant has its own connection: gRPC shares one between channels of equal arguments,
    and 100 watches would fill its FERRULE_MAX_STREAMS_PER_CONNECTION."""
    orgs: list[Org] = []
    for i in range(2):
        org = await _org(any_server)
        own_connection = any_server.client(
            make_token(org.id, subject=f"svc-{i}"),
            options=(("grpc.use_local_subchannel_pool", 1),),
        )
        orgs.append(Org(org.id, org.parent, own_connection))
    analyses = {o.id: [await create(o, f"t{i} {uuid.uuid4()}") for i in range(50)] for o in orgs}

    async def watch_to_end(o: Org, a: pb.Analysis) -> list[pb.Analysis]:
        # A deadline for the whole test, not the client's unary default: 200 writes follow.
        request = pb.WatchAnalysisRequest(name=a.name)
        return await rest_of(
            o.client.analyses.WatchAnalysis(request, timeout=WAIT_S * 4), WAIT_S * 4
        )

    tasks = [asyncio.create_task(watch_to_end(o, a)) for o in orgs for a in analyses[o.id]]
    for o in orgs:
        for a in analyses[o.id]:
            await finish(o, a.name, pb.ANALYSIS_STATE_COMPLETED)
    results = await asyncio.gather(*tasks)
    watched = [a for o in orgs for a in analyses[o.id]]
    for original, states in zip(watched, results, strict=True):
        assert states and {s.name for s in states} == {original.name}
        assert states[-1].state == pb.ANALYSIS_STATE_COMPLETED


async def test_on_mariadb_with_redis_a_watcher_on_one_server_sees_writes_of_another(
    start_server: StartServer, mariadb_database_url: str, redis_url: str, redis_namespace: str
) -> None:
    """Without NOTIFY, two servers sharing Redis carry changes by pub/sub, after commit."""
    shared = {"redis_url": redis_url, "ferrule_cache_prefix": redis_namespace}
    watching = await start_server(mariadb_database_url, **shared)
    writing = await start_server(mariadb_database_url, **shared)
    assert isinstance(watching.app.changes, RedisChangeFeed)
    await asyncio.wait_for(watching.app.changes.wait_listening(), WAIT_S)
    writer = await _org(writing)
    watcher = watching.for_org(writer.id)
    created = await create(writer, f"redis {uuid.uuid4()}")
    stream = watcher.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=created.name))
    assert (await next_of(stream)).state == pb.ANALYSIS_STATE_PENDING
    processing = await set_state(writer, created.name, pb.ANALYSIS_STATE_PROCESSING)
    seen = await next_of(stream)
    assert (seen.state, seen.etag) == (pb.ANALYSIS_STATE_PROCESSING, processing.etag)
    await set_state(writer, created.name, pb.ANALYSIS_STATE_FAILED)
    assert [a.state for a in await rest_of(stream)] == [pb.ANALYSIS_STATE_FAILED]


async def test_a_slow_consumer_holds_one_state_however_many_changes(
    start_server: StartServer, sqlite_database_url: str
) -> None:
    """A watcher that reads nothing while 200 changes commit gets the latest state when it
    reads again, not a backlog: the server's stream waits on HTTP/2 flow control with one
    re-read pending (a flag), whatever the number of changes."""
    server = await start_server(sqlite_database_url)
    org = await _org(server)
    # Messages larger than the HTTP/2 window (no BDP probing to grow it): the server can
    # have at most about one message in flight while the client reads nothing.
    slow = server.client(make_token(org.id), options=(("grpc.http2.bdp_probe", 0),))
    created = await create(org, "x" * 100_000)
    stream = slow.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=created.name))
    assert (await next_of(stream)).state == pb.ANALYSIS_STATE_PENDING
    await set_state(org, created.name, pb.ANALYSIS_STATE_PROCESSING)
    for i in range(200):
        last = await org.client.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(
                analysis=pb.Analysis(name=created.name, model_used=f"m{i}"),
                update_mask=field_mask_pb2.FieldMask(paths=["model_used"]),
            )
        )
    received = [await next_of(stream)]
    while received[-1].model_used != last.model_used:
        received.append(await next_of(stream))
    # The ones in flight when the client stopped reading, then the latest state.
    assert len(received) <= 5, [a.model_used for a in received]
    stream.cancel()
