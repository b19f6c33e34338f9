"""Reads on a real PostgreSQL streaming replica, writes on the primary, read-your-writes.

The module starts its own primary (initdb, wal_level=replica) and a streaming replica of
it (pg_basebackup -R) on free ports, and a server with DATABASE_REPLICA_URLS set.
Making the replica lag on purpose (pg_wal_replay_pause()) shows where each read went:
a row that exists only on the primary is invisible to a read served by the replica.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from db.migrate import upgrade_to_head
from db.replication import parse_lsn
from ferrule.client import AsyncFerruleClient
from ferrule.v1 import user_service_pb2 as pb
from server.read_routing import WriteTracker, router_for
from tests.server.conftest import RunningServer, StartServer
from tests.server.pg_cluster import Cluster, primary_and_replica

DATABASE = "ferrule_replicas"


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[Cluster, Cluster]]:
    with primary_and_replica() as pair:
        yield pair


@pytest.fixture(scope="module")
async def replicated_database(clusters: tuple[Cluster, Cluster]) -> tuple[Cluster, Cluster]:
    """A migrated database on the primary, visible on the replica."""
    primary, replica = clusters
    conn = await asyncpg.connect(primary.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    await upgrade_to_head(primary.url(DATABASE))
    for _ in range(300):  # bounded: 30 s for the replica to replay the migration
        try:
            conn = await asyncpg.connect(replica.dsn(DATABASE))
            try:
                if await conn.fetchval("SELECT count(*) FROM alembic_version"):
                    return clusters
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the replica never showed the migrated schema")


@pytest.fixture
async def srv(
    start_server: StartServer, replicated_database: tuple[Cluster, Cluster]
) -> RunningServer:
    primary, replica = replicated_database
    return await start_server(
        primary.url(DATABASE), migrate=False, database_replica_urls=[replica.url(DATABASE)]
    )


async def fetchval(cluster: Cluster, query: str, *args: object) -> object:
    conn = await asyncpg.connect(cluster.dsn(DATABASE))
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def wait_replayed(primary: Cluster, replica: Cluster) -> None:
    """Until the replica has replayed everything the primary had written when called."""
    target = parse_lsn(str(await fetchval(primary, "SELECT pg_current_wal_insert_lsn()::text")))
    for _ in range(300):
        replayed = await fetchval(replica, "SELECT pg_last_wal_replay_lsn()::text")
        if replayed is not None and parse_lsn(str(replayed)) >= target:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the replica did not catch up within 30 s")


@asynccontextmanager
async def replay_paused(replica: Cluster) -> AsyncIterator[None]:
    """The replica stops applying WAL (it keeps receiving it): it lags until resumed."""
    await fetchval(replica, "SELECT pg_wal_replay_pause()")
    try:
        for _ in range(300):
            if await fetchval(replica, "SELECT pg_get_wal_replay_pause_state()") == "paused":
                break
            await asyncio.sleep(0.1)
        else:
            raise TimeoutError("replay did not pause")
        yield
    finally:
        await fetchval(replica, "SELECT pg_wal_replay_resume()")


async def new_org(srv: RunningServer) -> str:
    org = await srv.admin().users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name="Replicated"))
    )
    return org.name


async def create_user(client: AsyncFerruleClient, org_name: str, email: str) -> pb.User:
    return await client.users.CreateUser(
        pb.CreateUserRequest(
            parent=org_name,
            user=pb.User(
                email=email,
                role=pb.USER_ROLE_MEMBER,
                status=pb.USER_STATUS_ACTIVE,
                auth_provider=pb.AUTH_PROVIDER_GOOGLE,
            ),
        )
    )


async def user_exists(cluster: Cluster, user: pb.User) -> bool:
    user_id = uuid.UUID(user.name.rpartition("/")[2])
    return bool(await fetchval(cluster, "SELECT count(*) FROM users WHERE id = $1", user_id))


async def test_reads_use_the_replica_writes_the_primary_and_writers_see_their_writes(
    srv: RunningServer, replicated_database: tuple[Cluster, Cluster]
) -> None:
    primary, replica = replicated_database
    org_name = await new_org(srv)
    org_id = org_name.rpartition("/")[2]
    await wait_replayed(primary, replica)
    writer = srv.for_org(org_id, subject="writer-svc")
    reader = srv.for_org(org_id, subject="reader-svc")
    router = router_for(srv.app.database)

    async with replay_paused(replica):
        user = await create_user(writer, org_name, "lagging@example.com")
        # The write landed on the primary; the paused replica has not applied it.
        assert await user_exists(primary, user)
        assert not await user_exists(replica, user)

        # Another caller's reads are served by the replica: they cannot see the user yet.
        # (Get by name goes through the cache, whose loader always reads the primary, so
        # lists show where reads go.)
        listed = await reader.users.ListUsers(pb.ListUsersRequest(parent=org_name))
        assert user.name not in [u.name for u in listed.users]

        # The writer reads its own write back, however long the replica lags.
        fallbacks = router.stats.lagging_fallbacks
        for _ in range(5):
            got = await writer.users.GetUser(pb.GetUserRequest(name=user.name))
            assert got.email == "lagging@example.com"
            listed = await writer.users.ListUsers(pb.ListUsersRequest(parent=org_name))
            assert user.name in [u.name for u in listed.users]
        assert router.stats.lagging_fallbacks >= fallbacks + 5

    # Once the replica has replayed the write, everyone reads it there, the writer too.
    await wait_replayed(primary, replica)
    got = await reader.users.GetUser(pb.GetUserRequest(name=user.name))
    assert got.email == "lagging@example.com"
    replica_reads = router.stats.replica_reads
    listed = await writer.users.ListUsers(pb.ListUsersRequest(parent=org_name))
    assert user.name in [u.name for u in listed.users]
    assert router.stats.replica_reads == replica_reads + 1


async def test_create_then_get_is_never_not_found_while_the_replica_lags(
    srv: RunningServer, replicated_database: tuple[Cluster, Cluster]
) -> None:
    primary, replica = replicated_database
    org_name = await new_org(srv)
    org_id = org_name.rpartition("/")[2]
    writers = [srv.for_org(org_id, subject=f"writer-{i}") for i in range(4)]

    async def create_and_read(client: AsyncFerruleClient, n: int) -> None:
        for i in range(10):
            user = await create_user(client, org_name, f"u{n}-{i}@example.com")
            got = await client.users.GetUser(pb.GetUserRequest(name=user.name))
            assert got.name == user.name

    # Natural replication lag first (replay running, reads racing it), then a stalled one.
    await asyncio.gather(*(create_and_read(c, n) for n, c in enumerate(writers)))
    async with replay_paused(replica):
        await asyncio.gather(*(create_and_read(c, n + 10) for n, c in enumerate(writers)))
    await wait_replayed(primary, replica)


async def test_read_your_writes_holds_across_server_processes(
    start_server: StartServer,
    replicated_database: tuple[Cluster, Cluster],
    redis_url: str,
    redis_namespace: str,
) -> None:
    """Write through one server, list through another: the shared writer counter in
    Redis sends the second server's read to the primary while the replica lags."""
    primary, replica = replicated_database
    common = {
        "migrate": False,
        "database_replica_urls": [replica.url(DATABASE)],
        "redis_url": redis_url,
        "ferrule_cache_prefix": redis_namespace,
    }
    first = await start_server(primary.url(DATABASE), **common)
    second = await start_server(primary.url(DATABASE), **common)
    org_name = await new_org(first)
    org_id = org_name.rpartition("/")[2]
    writer_first = first.for_org(org_id, subject="roaming-writer")
    writer_second = second.for_org(org_id, subject="roaming-writer")
    bystander = second.for_org(org_id, subject="bystander")
    await wait_replayed(primary, replica)
    async with replay_paused(replica):
        user = await create_user(writer_first, org_name, "roaming@example.com")
        listed = await writer_second.users.ListUsers(pb.ListUsersRequest(parent=org_name))
        assert user.name in {u.name for u in listed.users}
        # Someone who did not write still reads the (lagging) replica.
        others = await bystander.users.ListUsers(pb.ListUsersRequest(parent=org_name))
        assert user.name not in {u.name for u in others.users}
    await wait_replayed(primary, replica)


async def test_each_caller_is_tracked_separately(
    srv: RunningServer, replicated_database: tuple[Cluster, Cluster]
) -> None:
    """The same subject in two organizations (or two subjects) are different callers:
    only the one that wrote pays for primary reads."""
    primary, replica = replicated_database
    org_name = await new_org(srv)
    org_id = org_name.rpartition("/")[2]
    await wait_replayed(primary, replica)
    writer = srv.for_org(org_id, subject="same-svc")
    bystander = srv.for_org(org_id, subject="other-svc")
    router = router_for(srv.app.database)
    async with replay_paused(replica):
        user = await create_user(writer, org_name, "tracked@example.com")
        replica_reads = router.stats.replica_reads
        await bystander.users.ListUsers(pb.ListUsersRequest(parent=org_name))
        assert router.stats.replica_reads == replica_reads + 1
        listed = await writer.users.ListUsers(pb.ListUsersRequest(parent=org_name))
        assert user.name in [u.name for u in listed.users]
        assert router.stats.replica_reads == replica_reads + 1


def test_evicted_callers_raise_a_floor_every_read_honours() -> None:
    tracker = WriteTracker(max_callers=1)
    tracker.wrote(("a", "org"))
    tracker.wrote(("b", "org"))  # evicts a
    assert len(tracker) == 1
    assert any(mark.pending for mark in tracker.marks_for(("a", "org")))
    assert any(mark.pending for mark in tracker.marks_for(None))
