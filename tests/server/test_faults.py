"""Database faults under load: connections killed, the database stopped and started.

1. Mixed load (reads, unary and batch writes, a prediction stream through the client
   helper) while the server's backends are killed again and again with
   pg_terminate_backend, on the shared PostgreSQL (only this test's own database).
   Reads recover without restarting Ferrule; writes either succeed or fail with
   UNAVAILABLE + RetryInfo and are never half-applied (checked in the database);
   the stream resumes and the final row count is exact.
2. A throwaway cluster (tests/server/pg_cluster.py) is stopped and started under a
   running server: grpc.health.v1 goes NOT_SERVING and back to SERVING, and
   GetHealthReport says the database is unreachable meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferrule.client import AsyncFerruleClient, FerruleError, Unavailable
from ferrule.client.ingest import AsyncPredictionStreamer
from ferrule.v1 import health_service_pb2 as health_service_pb
from ferrule.v1 import prediction_service_pb2 as pred_pb
from ferrule.v1 import user_service_pb2 as user_pb
from tests.polling import eventually
from tests.server import pg_cluster
from tests.server.conftest import RunningServer, StartServer, make_token

pytestmark = pytest.mark.timeout(180)

KILL_ROUNDS = 12
KILL_INTERVAL = 0.4
BATCH_ROWS = 20
STREAM_ROWS = 3000


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _org_id(name: str) -> str:
    return name.removeprefix("organizations/")


def _no_retries(
    server: RunningServer, parent: str, scope: str = "read write"
) -> AsyncFerruleClient:
    """A client that does not retry UNAVAILABLE, so the load sees the server's statuses."""
    return server.client(make_token(_org_id(parent), scope), max_attempts=1)


@dataclass
class Outcomes:
    """What the load saw: acknowledged and UNAVAILABLE writes, and anything else."""

    acked_batches: set[str] = field(default_factory=set)
    failed_batches: set[str] = field(default_factory=set)
    acked_users: dict[str, str] = field(default_factory=dict)  # request_id -> email
    failed_users: dict[str, str] = field(default_factory=dict)
    reads_ok: int = 0
    reads_unavailable: int = 0
    unexpected: list[FerruleError] = field(default_factory=list)
    missing_retry_info: list[FerruleError] = field(default_factory=list)

    def failed(self, error: FerruleError) -> bool:
        """True for UNAVAILABLE (with RetryInfo, else noted); anything else is noted."""
        if isinstance(error, Unavailable):
            if error.retry_delay is None:
                self.missing_retry_info.append(error)
            return True
        self.unexpected.append(error)
        return False


def _prediction(subject: str, i: int) -> pred_pb.Prediction:
    message = pred_pb.Prediction(
        subject_id=subject, probability=(i % 100) / 100, model_name="m", model_version="v1"
    )
    message.features.update({"i": i})
    return message


async def _kill_backends(database_url: str, stop: asyncio.Event) -> int:
    """Terminate every backend of this test's database, KILL_ROUNDS times."""
    database = database_url.rsplit("/", 1)[1]
    killed = 0
    conn = await asyncpg.connect(_dsn(database_url).rsplit("/", 1)[0] + "/postgres")
    try:
        for _ in range(KILL_ROUNDS):
            await asyncio.sleep(KILL_INTERVAL)
            killed += await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
    finally:
        stop.set()
        await conn.close()
    return killed


async def _batch_writer(
    server: RunningServer, parent: str, stop: asyncio.Event, out: Outcomes
) -> None:
    client = _no_retries(server, parent)
    n = 0
    while not stop.is_set():
        request_id = str(uuid.uuid4())
        rows = [
            pred_pb.CreatePredictionRequest(prediction=_prediction(f"batch-{n}-{j}", j))
            for j in range(BATCH_ROWS)
        ]
        n += 1
        try:
            await client.predictions.BatchCreatePredictions(
                pred_pb.BatchCreatePredictionsRequest(
                    parent=parent, requests=rows, request_id=request_id
                )
            )
            out.acked_batches.add(request_id)
        except FerruleError as error:
            if out.failed(error):
                out.failed_batches.add(request_id)
        await asyncio.sleep(0.02)


def _user_request(parent: str, request_id: str, email: str) -> user_pb.CreateUserRequest:
    return user_pb.CreateUserRequest(
        parent=parent,
        request_id=request_id,
        user=user_pb.User(
            email=email,
            full_name="Fault Tolerant",
            role=user_pb.USER_ROLE_MEMBER,
            status=user_pb.USER_STATUS_ACTIVE,
            auth_provider=user_pb.AUTH_PROVIDER_GOOGLE,
            profile=user_pb.UserProfile(bio="written under fire", locale="en-GB"),
        ),
    )


async def _user_writer(
    server: RunningServer, parent: str, stop: asyncio.Event, out: Outcomes
) -> None:
    client = _no_retries(server, parent)
    n = 0
    while not stop.is_set():
        request_id, email = str(uuid.uuid4()), f"user{n}@faults.example"
        n += 1
        try:
            await client.users.CreateUser(_user_request(parent, request_id, email))
            out.acked_users[request_id] = email
        except FerruleError as error:
            if out.failed(error):
                out.failed_users[request_id] = email
        await asyncio.sleep(0.02)


async def _reader(
    server: RunningServer, parent: str, user_name: str, stop: asyncio.Event, out: Outcomes
) -> None:
    client = _no_retries(server, parent, scope="read")
    while not stop.is_set():
        try:
            await client.users.GetUser(user_pb.GetUserRequest(name=user_name))
            await client.users.ListUsers(user_pb.ListUsersRequest(parent=parent, page_size=10))
            await client.predictions.ListPredictions(
                pred_pb.ListPredictionsRequest(parent=parent, page_size=10)
            )
            out.reads_ok += 1
        except FerruleError as error:
            if out.failed(error):
                out.reads_unavailable += 1
        await asyncio.sleep(0.01)


async def _stream(server: RunningServer, parent: str, prefix: str) -> tuple[int, int]:
    """Stream STREAM_ROWS rows through the helper; (accepted + duplicates, reconnects)."""
    client = server.for_org(_org_id(parent))
    async with AsyncPredictionStreamer(
        client, parent, batch_size=100, max_in_flight=4, max_attempts=20, batch_id_prefix=prefix
    ) as streamer:
        for i in range(STREAM_ROWS):
            await streamer.add(_prediction(f"stream-{i}", i))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # spread the stream over the fault window
        totals = await streamer.flush()
    assert not totals.rejected
    return totals.accepted + totals.duplicates, totals.reconnects


async def test_killed_backends_under_mixed_load(pg_server: RunningServer) -> None:
    admin = pg_server.admin()
    org = await admin.users.CreateOrganization(
        user_pb.CreateOrganizationRequest(organization=user_pb.Organization(display_name="Faults"))
    )
    parent = org.name
    org_client = pg_server.for_org(_org_id(parent))
    seed = await org_client.users.CreateUser(
        _user_request(parent, str(uuid.uuid4()), "seed@faults.example")
    )
    stream_prefix = f"stream-{uuid.uuid4()}"

    stop = asyncio.Event()
    out = Outcomes()
    load = [
        asyncio.create_task(_batch_writer(pg_server, parent, stop, out)),
        asyncio.create_task(_user_writer(pg_server, parent, stop, out)),
        asyncio.create_task(_reader(pg_server, parent, seed.name, stop, out)),
        asyncio.create_task(_reader(pg_server, parent, seed.name, stop, out)),
    ]
    stream = asyncio.create_task(_stream(pg_server, parent, stream_prefix))
    killed = await _kill_backends(pg_server.database_url, stop)
    await asyncio.gather(*load)
    streamed, _reconnects = await asyncio.wait_for(stream, 120)

    assert killed > 0
    assert not out.unexpected, f"statuses other than UNAVAILABLE: {out.unexpected[:5]}"
    assert not out.missing_retry_info, out.missing_retry_info[:5]
    assert out.acked_batches and out.acked_users and out.reads_ok

    # Reads recover without restarting Ferrule (pre-ping, reconnect): every one succeeds.
    for _ in range(10):
        await org_client.users.GetUser(user_pb.GetUserRequest(name=seed.name))
        await org_client.predictions.ListPredictions(
            pred_pb.ListPredictionsRequest(parent=parent, page_size=10)
        )

    # The stream resumed: every row exactly once.
    assert streamed == STREAM_ROWS
    conn = await asyncpg.connect(_dsn(pg_server.database_url))
    try:
        organization_id = uuid.UUID(_org_id(parent))
        stream_rows = await conn.fetchval(
            "SELECT count(*) FROM predictions WHERE organization_id = $1 AND subject_id "
            "LIKE 'stream-%'",
            organization_id,
        )
        distinct_subjects = await conn.fetchval(
            "SELECT count(DISTINCT subject_id) FROM predictions WHERE organization_id = $1 "
            "AND subject_id LIKE 'stream-%'",
            organization_id,
        )
        assert stream_rows == distinct_subjects == STREAM_ROWS

        # Batch writes: acknowledged ones whole; failed ones whole or absent; nothing else.
        per_request = {
            r["request_id"]: r["n"]
            for r in await conn.fetch(
                "SELECT request_id, count(*) AS n FROM predictions WHERE organization_id = $1 "
                "AND subject_id LIKE 'batch-%' GROUP BY request_id",
                organization_id,
            )
        }
        for request_id in out.acked_batches:
            assert per_request.get(request_id) == BATCH_ROWS, request_id
        for request_id in out.failed_batches:
            assert per_request.get(request_id, 0) in (0, BATCH_ROWS), request_id
        assert set(per_request) <= out.acked_batches | out.failed_batches

        # User writes: acknowledged ones present; none without its profile; nothing else.
        emails = {
            r["email"]
            for r in await conn.fetch(
                "SELECT email FROM users WHERE organization_id = $1", organization_id
            )
        }
        assert set(out.acked_users.values()) <= emails
        assert emails - {"seed@faults.example"} <= set(out.acked_users.values()) | set(
            out.failed_users.values()
        )
        orphans = await conn.fetchval(
            "SELECT count(*) FROM users u LEFT JOIN user_profiles p ON p.user_id = u.id "
            "WHERE p.user_id IS NULL"
        )
        assert orphans == 0
    finally:
        await conn.close()

    # A failed write may be retried with its request_id: it lands exactly once.
    for request_id, email in out.failed_users.items():
        await org_client.users.CreateUser(_user_request(parent, request_id, email))
    for request_id in out.failed_batches:
        rows = [
            pred_pb.CreatePredictionRequest(prediction=_prediction(f"batch-retry-{j}", j))
            for j in range(BATCH_ROWS)
        ]
        await org_client.predictions.BatchCreatePredictions(
            pred_pb.BatchCreatePredictionsRequest(
                parent=parent, requests=rows, request_id=request_id
            )
        )
    conn = await asyncpg.connect(_dsn(pg_server.database_url))
    try:
        organization_id = uuid.UUID(_org_id(parent))
        users = await conn.fetchval(
            "SELECT count(*) FROM users WHERE organization_id = $1", organization_id
        )
        assert users == 1 + len(out.acked_users) + len(out.failed_users)
        batch_rows = await conn.fetchval(
            "SELECT count(*) FROM predictions WHERE organization_id = $1 "
            "AND subject_id LIKE 'batch-%'",
            organization_id,
        )
        assert batch_rows == BATCH_ROWS * (len(out.acked_batches) + len(out.failed_batches))
    finally:
        await conn.close()


# --- the database stopped and started -------------------------------------------------


async def _health_status(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    status: int = response.status
    return status


async def _wait_for_status(channel: grpc.aio.Channel, wanted: int) -> None:
    async def reached() -> bool:
        try:
            return await _health_status(channel) == wanted
        except grpc.aio.AioRpcError:
            return False  # a check that timed out on a busy machine: look again

    await eventually(
        reached,
        what=f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)}",
        interval=0.2,
    )


async def test_health_follows_the_database_down_and_back(start_server: StartServer) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with pg_cluster.standalone_cluster() as cluster:
        await asyncio.to_thread(_create_database, cluster)
        server = await start_server(
            cluster.url("ferrule"),
            migrate=True,
            ferrule_health_probe_seconds=0.2,
            database_pool_timeout=2.0,
        )
        admin = server.admin()
        org = await admin.users.CreateOrganization(
            user_pb.CreateOrganizationRequest(
                organization=user_pb.Organization(display_name="Down and up")
            )
        )
        async with grpc.aio.insecure_channel(server.target) as channel:
            assert await _health_status(channel) == serving

            await asyncio.to_thread(cluster.stop)
            await _wait_for_status(channel, not_serving)
            report = await admin.health.GetHealthReport(
                health_service_pb.GetHealthReportRequest(), timeout=15
            )
            assert not report.database.reachable
            # A write while the database is gone: UNAVAILABLE, with when to retry.
            with pytest.raises(Unavailable) as refused:
                await admin.users.CreateOrganization(
                    user_pb.CreateOrganizationRequest(
                        organization=user_pb.Organization(display_name="lost")
                    ),
                    timeout=15,
                )
            assert refused.value.retry_delay is not None

            await asyncio.to_thread(cluster.start)
            await _wait_for_status(channel, serving)
            report = await admin.health.GetHealthReport(
                health_service_pb.GetHealthReportRequest(), timeout=15
            )
            assert report.database.reachable
            # Same server process, no restart: reads and writes work again.
            got = await admin.users.GetOrganization(user_pb.GetOrganizationRequest(name=org.name))
            assert got.display_name == "Down and up"
            await admin.users.CreateOrganization(
                user_pb.CreateOrganizationRequest(
                    organization=user_pb.Organization(display_name="back")
                )
            )
        listed = await admin.users.ListOrganizations(user_pb.ListOrganizationsRequest())
        assert sorted(o.display_name for o in listed.organizations) == ["Down and up", "back"]


def _create_database(cluster: pg_cluster.Cluster) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await conn.execute('CREATE DATABASE "ferrule"')
        finally:
            await conn.close()

    asyncio.run(create())
