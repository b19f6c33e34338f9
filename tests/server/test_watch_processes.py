"""Watches across server processes: two `python -m server` processes on one PostgreSQL
database; a watcher on process A learns of writes made through process B (NOTIFY in
the writing transaction, LISTEN in A), never before their commit, and re-reads after
its LISTEN connection is lost."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar, cast

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from db.change_feed import LISTENER_APPLICATION_NAME, Change, PostgresChangeFeed
from db.engine import Database
from db.models.enums import AnalysisState
from db.repositories.analyses import AnalysesRepository
from db.repositories.organizations import OrganizationsRepository
from db.tenancy import Tenant
from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import analysis_service_pb2 as pb
from ferrule.v1 import prediction_service_pb2 as ppb
from tests.server.conftest import make_token
from tests.server.process_helpers import free_port, server_env, start_server_process, wait_serving
from tests.server.test_scale_out import stop_tree

T = TypeVar("T")
WAIT_S = 30.0  # a bound on a hang; delivery time is `make bench BENCH_ARGS=watch`


async def next_of(stream: grpc.aio.UnaryStreamCall[Any, T]) -> T:
    message = await asyncio.wait_for(stream.read(), WAIT_S)
    assert message is not grpc.aio.EOF, "the stream ended early"
    return cast(T, message)


@pytest.fixture
async def two_processes(pg_database_url: str) -> AsyncIterator[tuple[str, str]]:
    procs: list[subprocess.Popen[bytes]] = []
    targets = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(start_server_process(server_env(pg_database_url, port)))
            targets.append(f"127.0.0.1:{port}")
        for target in targets:
            await asyncio.to_thread(wait_serving, target)
        yield targets[0], targets[1]
    finally:
        for proc in procs:
            stop_tree(proc, [])


async def _organization(database_url: str) -> uuid.UUID:
    database = Database.from_url(database_url)
    try:
        async with database.transaction(Tenant.all()) as session:
            return (await OrganizationsRepository(session, Tenant.all()).create("watched")).id
    finally:
        await database.dispose()


def _client(target: str, organization_id: uuid.UUID) -> AsyncFerruleClient:
    return AsyncFerruleClient(
        config=ClientConfig(target=target, token=make_token(organization_id), default_timeout=20)
    )


async def _update(client: AsyncFerruleClient, name: str, state: int) -> pb.Analysis:
    return await client.analyses.UpdateAnalysis(
        pb.UpdateAnalysisRequest(
            analysis=pb.Analysis(name=name, state=cast(Any, state)),
            update_mask=field_mask_pb2.FieldMask(paths=["state"]),
        )
    )


async def test_a_watcher_on_one_process_sees_commits_made_through_the_other_and_only_them(
    two_processes: tuple[str, str], pg_database_url: str
) -> None:
    target_a, target_b = two_processes
    org_id = await _organization(pg_database_url)
    parent = f"organizations/{org_id}"
    async with _client(target_a, org_id) as a, _client(target_b, org_id) as b:
        batch = await b.analyses.CreateBatch(
            pb.CreateBatchRequest(parent=parent, batch=pb.AnalysisBatch(display_name="x"))
        )
        held, written = [
            await b.analyses.CreateAnalysis(
                pb.CreateAnalysisRequest(
                    parent=parent,
                    analysis=pb.Analysis(
                        text=f"{what} {uuid.uuid4()}",
                        analysis_type=pb.ANALYSIS_TYPE_SENTIMENT,
                        batch=batch.name,
                    ),
                )
            )
            for what in ("held", "written")
        ]
        watch_one = a.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=written.name))
        watch_batch = a.analyses.WatchBatch(pb.WatchBatchRequest(name=batch.name))
        assert (await next_of(watch_one)).state == pb.ANALYSIS_STATE_PENDING
        assert (await next_of(watch_batch)).progress.pending_count == 2

        # A writer mid-transaction: its row change and its NOTIFY are not committed yet.
        database = Database.from_url(pg_database_url)
        try:
            async with database.transaction(Tenant.of(org_id)) as session:
                held_id = uuid.UUID(held.name.rsplit("/", 1)[1])
                await AnalysesRepository(session, Tenant.of(org_id)).update(
                    held_id, {"state": AnalysisState.PROCESSING}
                )
                await PostgresChangeFeed(pg_database_url).stage(
                    session, [Change(org_id, "analysis", held_id)]
                )
                # Meanwhile a write through process B commits and reaches process A...
                updated = await _update(b, written.name, pb.ANALYSIS_STATE_PROCESSING)
                seen = await next_of(watch_one)
                assert (seen.state, seen.etag) == (pb.ANALYSIS_STATE_PROCESSING, updated.etag)
                # ...and the batch re-read it caused shows that write but not the open one.
                progress = (await next_of(watch_batch)).progress
                assert (progress.pending_count, progress.processing_count) == (1, 1)
            # Committed now: the held change arrives after its commit.
            progress = (await next_of(watch_batch)).progress
            assert (progress.pending_count, progress.processing_count) == (0, 2)
        finally:
            await database.dispose()

        await _update(b, written.name, pb.ANALYSIS_STATE_COMPLETED)
        assert [m.state async for m in watch_one] == [pb.ANALYSIS_STATE_COMPLETED]


async def test_a_lost_listen_connection_makes_watchers_re_read(
    two_processes: tuple[str, str], pg_database_url: str
) -> None:
    """While process A's LISTEN connection is down, a commit's NOTIFY is lost; A's
    reconnection wakes every watcher, which re-reads and sends the committed state."""
    target_a, target_b = two_processes
    org_id = await _organization(pg_database_url)
    parent = f"organizations/{org_id}"
    async with _client(target_a, org_id) as a, _client(target_b, org_id) as b:
        created = await b.analyses.CreateAnalysis(
            pb.CreateAnalysisRequest(
                parent=parent,
                analysis=pb.Analysis(
                    text=f"lost {uuid.uuid4()}", analysis_type=pb.ANALYSIS_TYPE_SENTIMENT
                ),
            )
        )
        watch = a.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=created.name))
        assert (await next_of(watch)).state == pb.ANALYSIS_STATE_PENDING
        database = Database.from_url(pg_database_url)
        try:
            async with database.engine.connect() as conn:
                # Every listening backend of this database (both processes') is ended.
                ended = await conn.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_stat_activity l "
                        "WHERE l.datname = current_database() AND l.pid <> pg_backend_pid() "
                        "AND l.application_name = :name"
                    ),
                    {"name": LISTENER_APPLICATION_NAME},
                )
                assert ended == 2  # one per process
        finally:
            await database.dispose()
        updated = await _update(b, created.name, pb.ANALYSIS_STATE_PROCESSING)
        seen = await next_of(watch)
        assert (seen.state, seen.etag) == (pb.ANALYSIS_STATE_PROCESSING, updated.etag)


@pytest.fixture(params=["postgresql", "mariadb", "sqlite"])
def shared_database(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """A database for server processes, and their extra environment: PostgreSQL carries
    wake-ups by NOTIFY; MariaDB and SQLite (one file, two processes) by Redis pub/sub."""
    fixture = {"postgresql": "pg", "mariadb": "mariadb", "sqlite": "sqlite"}[request.param]
    url: str = request.getfixturevalue(f"{fixture}_database_url")
    if request.param == "postgresql":
        return url, {}
    redis_url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_namespace")
    return url, {"REDIS_URL": redis_url, "FERRULE_CACHE_PREFIX": prefix}


async def test_watch_predictions_resumed_after_its_process_is_killed_yields_each_row_once(
    shared_database: tuple[str, dict[str, str]],
) -> None:
    """A writer keeps inserting through process B while a WatchPredictions (HIGH only) on
    process A is killed (SIGKILL) mid-stream; a watch resumed on a fresh process from the
    last cursor the caller processed delivers every HIGH row exactly once (count and
    checksum against what the writer committed)."""
    database_url, extra = shared_database
    org_id = await _organization(database_url)
    parent = f"organizations/{org_id}"
    high = ppb.PredictionFilter(risk_level=ppb.RISK_LEVEL_HIGH)
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        procs.append(start_server_process(server_env(database_url, port, **extra)))
        return procs[-1], f"127.0.0.1:{port}"

    try:
        (proc_a, target_a), (_, target_b) = start(), start()
        for target in (target_a, target_b):
            await asyncio.to_thread(wait_serving, target)
        written: list[str] = []
        killed = asyncio.Event()

        async def write(client: AsyncFerruleClient) -> None:
            for i in range(60):  # bounded: 60 commits of 20 rows, half of them HIGH
                if i == 30:
                    await killed.wait()  # half before the kill, half during and after it
                response = await client.predictions.BatchCreatePredictions(
                    ppb.BatchCreatePredictionsRequest(
                        parent=parent,
                        requests=[
                            ppb.CreatePredictionRequest(
                                prediction=ppb.Prediction(
                                    subject_id=f"s{i}-{j}",
                                    probability=0.9 if j % 2 else 0.1,
                                    risk_level=ppb.RISK_LEVEL_HIGH if j % 2 else ppb.RISK_LEVEL_LOW,
                                    model_name="m",
                                    model_version="v",
                                )
                            )
                            for j in range(20)
                        ],
                    )
                )
                written.extend(
                    p.name for p in response.predictions if p.risk_level == ppb.RISK_LEVEL_HIGH
                )

        received: list[str] = []
        async with _client(target_a, org_id) as a, _client(target_b, org_id) as b:
            stream = a.predictions.WatchPredictions(
                ppb.WatchPredictionsRequest(parent=parent, filter=high), timeout=120
            )
            cursor = (await next_of(stream)).cursor
            writer = asyncio.create_task(write(b))
            while len(received) < 100:
                response = await next_of(stream)
                received += [p.name for p in response.predictions]
                cursor = response.cursor
            proc_a.kill()
            killed.set()
            await asyncio.to_thread(proc_a.wait, 30)
            _, target_c = start()
            await asyncio.to_thread(wait_serving, target_c)
            async with _client(target_c, org_id) as c:
                resumed = c.predictions.WatchPredictions(
                    ppb.WatchPredictionsRequest(parent=parent, filter=high, cursor=cursor),
                    timeout=120,
                )
                await next_of(resumed)
                await asyncio.wait_for(writer, WAIT_S * 4)
                while len(received) < len(written):
                    received += [p.name for p in (await next_of(resumed)).predictions]
                resumed.cancel()
        assert len(written) == 600
        assert len(received) == len(set(received)) == len(written)

        def checksum(names: list[str]) -> str:
            return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()

        assert checksum(received) == checksum(written)
    finally:
        for proc in procs:
            stop_tree(proc, [])
