"""The server behind PgBouncer in transaction mode (Debian's pgbouncer, started here).

Transaction pooling hands each transaction to whichever server backend is free, so
anything session-scoped (named prepared statements, SET without LOCAL, SET ROLE) would
break or leak. The server runs with DATABASE_STATEMENT_CACHE_SIZE=0 and the RLS
application role, more concurrent calls than PgBouncer has backends, and two tenants
interleaved: no error, each tenant sees exactly its own rows, and a bare transaction on
a shared backend finds no tenant setting or role left behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from ferrule.client import AsyncFerruleClient
from ferrule.v1 import user_service_pb2 as pb
from tests.conftest import TEST_DATABASE_URL
from tests.server.conftest import RunningServer, StartServer
from tests.server.pg_cluster import PgBouncer, pgbouncer

POOL_SIZE = 3  # PgBouncer backends per database: far fewer than concurrent calls
CALLS_PER_ORG = 24
APP_ROLE = "ferrule_app"


def database_name(url: str) -> str:
    return url.rpartition("/")[2]


@pytest.fixture
def bouncer(pg_admin_url: str) -> Iterator[PgBouncer]:
    """PgBouncer in front of the test PostgreSQL server (every database on it)."""
    upstream = make_url(pg_admin_url)
    with pgbouncer(
        upstream.host or "127.0.0.1",
        upstream.port or 5432,
        pool_mode="transaction",
        pool_size=POOL_SIZE,
    ) as running:
        yield running


@pytest.fixture
async def bounced(
    start_server: StartServer, pg_database_url: str, bouncer: PgBouncer
) -> RunningServer:
    return await start_server(
        bouncer.url(database_name(pg_database_url)),
        migrate=False,
        database_statement_cache_size=0,
        database_app_role=APP_ROLE,
        database_pool_size=10,
        database_max_overflow=10,
    )


async def new_org(server: RunningServer, display_name: str) -> str:
    org = await server.admin().users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name=display_name))
    )
    return org.name


async def create_get_list(client: AsyncFerruleClient, org_name: str, n: int) -> set[str]:
    """One caller's work: create a user, read it back, list; returns names it saw."""
    user = await client.users.CreateUser(
        pb.CreateUserRequest(
            parent=org_name,
            user=pb.User(
                email=f"user{n}@{org_name.rpartition('/')[2][:8]}.example.com",
                role=pb.USER_ROLE_MEMBER,
                status=pb.USER_STATUS_ACTIVE,
                auth_provider=pb.AUTH_PROVIDER_GOOGLE,
            ),
        )
    )
    got = await client.users.GetUser(pb.GetUserRequest(name=user.name))
    assert got.name == user.name
    listed = await client.users.ListUsers(pb.ListUsersRequest(parent=org_name, page_size=1000))
    seen = {u.name for u in listed.users}
    assert user.name in seen
    return seen


async def upstream_backends(database: str) -> int:
    conn = await asyncpg.connect(TEST_DATABASE_URL.replace("+asyncpg", ""))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
        )
        return count
    finally:
        await conn.close()


async def test_concurrent_tenants_through_transaction_pooling(
    bounced: RunningServer, bouncer: PgBouncer, pg_database_url: str
) -> None:
    orgs = [await new_org(bounced, "Bounce A"), await new_org(bounced, "Bounce B")]
    clients = [bounced.for_org(org.rpartition("/")[2]) for org in orgs]
    database = database_name(pg_database_url)

    peak_backends = 0
    stop = asyncio.Event()

    async def watch_upstream() -> None:
        nonlocal peak_backends
        while not stop.is_set():
            peak_backends = max(peak_backends, await upstream_backends(database))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_upstream())
    try:
        # Interleaved: call i goes to organization i % 2, all at once.
        results = await asyncio.gather(
            *(create_get_list(clients[i % 2], orgs[i % 2], i) for i in range(2 * CALLS_PER_ORG))
        )
    finally:
        stop.set()
        await watcher

    for i, seen in enumerate(results):
        own = orgs[i % 2] + "/"
        assert all(name.startswith(own) for name in seen), "a tenant saw another's rows"
    for org, client in zip(orgs, clients, strict=True):
        listed = await client.users.ListUsers(pb.ListUsersRequest(parent=org, page_size=1000))
        assert len(listed.users) == CALLS_PER_ORG
        assert all(u.name.startswith(org + "/") for u in listed.users)
    # 48 concurrent calls and a pool of 20 on the server side, never more than
    # PgBouncer's backends on the database itself: the calls really were multiplexed.
    assert 0 < peak_backends <= POOL_SIZE


async def test_no_tenant_setting_or_role_survives_its_transaction(
    bounced: RunningServer, bouncer: PgBouncer, pg_database_url: str
) -> None:
    """Bare transactions on the same PgBouncer backends, between and during tenant
    transactions, see no organization, no all-organizations flag and no switched role."""
    org = await new_org(bounced, "Leak check")
    client = bounced.for_org(org.rpartition("/")[2])
    database = database_name(pg_database_url)
    probe = await asyncpg.connect(bouncer.dsn(database), statement_cache_size=0)
    observed: set[tuple[str | None, str | None, str]] = set()

    async def probe_loop() -> None:
        for _ in range(60):
            row = await probe.fetchrow(
                "SELECT current_setting('ferrule.organization_id', true) AS org,"
                " current_setting('ferrule.all_organizations', true) AS all_orgs,"
                " current_user AS role"
            )
            assert row is not None
            observed.add((row["org"], row["all_orgs"], row["role"]))
            await asyncio.sleep(0)

    try:
        await asyncio.gather(
            probe_loop(), *(create_get_list(client, org, i) for i in range(3 * POOL_SIZE))
        )
    finally:
        await probe.close()
    # A custom setting once set in a session reads back as '' afterwards; never a value.
    assert {(o or "", a or "", r) for o, a, r in observed} <= {
        ("", "", "postgres"),
        ("", "off", "postgres"),
    }
