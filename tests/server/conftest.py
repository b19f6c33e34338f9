"""End-to-end fixtures: the real server on a free port, called through the real client.

`start_server` runs FerruleApp (the same assembly `python -m server` runs) in the test's
event loop against a fresh database at head (cloned from the migrated template); tests
then talk to it only through the published client package (`ferrule.client`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest

from db.migrate import upgrade_to_head
from ferrule.client import AsyncFerruleClient, ClientConfig
from server.app import FerruleApp
from server.settings import Settings
from server.telemetry import Telemetry, setup_telemetry
from tests.conftest import (
    ADMIN_URL_FIXTURES,
    DATABASE_FIXTURES,
    MODULE_DATABASE_FIXTURES,
    CreateDatabase,
)
from tests.polling import finishes

JWT_SECRET = "test-jwt-secret-" + "x" * 32
ADMIN_TOKEN = "test-admin-token-" + "y" * 16


def make_token(
    organization: str | uuid.UUID,
    scope: str = "read write",
    subject: str = "svc-test",
    ttl: float = 3600,
) -> str:
    claims = {
        "sub": subject,
        "org": str(organization),
        "scope": scope,
        "exp": int(time.time() + ttl),
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@dataclass
class RunningServer:
    app: FerruleApp
    database_url: str
    target: str
    clients: list[AsyncFerruleClient] = field(default_factory=list)

    def client(self, token: str | None = ADMIN_TOKEN, **config: Any) -> AsyncFerruleClient:
        """An asyncio client for this server (closed at teardown)."""
        client = AsyncFerruleClient(config=ClientConfig(target=self.target, token=token, **config))
        self.clients.append(client)
        return client

    def admin(self) -> AsyncFerruleClient:
        return self.client(ADMIN_TOKEN)

    def for_org(
        self, organization: str | uuid.UUID, scope: str = "read write", subject: str = "svc-test"
    ) -> AsyncFerruleClient:
        return self.client(make_token(organization, scope, subject))


StartServer = Callable[..., Awaitable[RunningServer]]


def server_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ferrule_listen": "127.0.0.1:0",
        "database_url": database_url,
        "ferrule_jwt_secret": JWT_SECRET,
        "ferrule_admin_token": ADMIN_TOKEN,
        "ferrule_grace_seconds": 2.0,
        "ferrule_health_probe_seconds": 0.5,
        "database_pool_size": 5,
        "database_max_overflow": 5,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def start_server(create_pg_database: CreateDatabase) -> AsyncIterator[StartServer]:
    """Factory: `await start_server(database_url, **settings)` -> RunningServer.

    The database fixtures' URLs are at head already; `migrate=True` runs the migrations
    first, for a database that is not (one from `create_pg_database(migrated=False)`).
    Depends on the database factory so that pytest tears the servers down *before* it
    drops the databases they use (fixtures finish in reverse order of setup).
    """
    running: list[RunningServer] = []

    async def start(
        database_url: str,
        *,
        migrate: bool = False,
        telemetry: Telemetry | None = None,
        **overrides: Any,
    ) -> RunningServer:
        if migrate:
            await upgrade_to_head(database_url)
        if telemetry is None:  # no exporters, and leave the process-global providers alone
            telemetry = setup_telemetry(environ={}, set_global=False)
        app = FerruleApp(server_settings(database_url, **overrides), telemetry=telemetry)
        port = await app.start()
        server = RunningServer(app=app, database_url=database_url, target=f"127.0.0.1:{port}")
        running.append(server)
        return server

    yield start
    for server in running:
        for client in server.clients:
            await finishes(client.close(), what="client.close")
        await finishes(server.app.stop(grace=0.5), what="FerruleApp.stop")


@pytest.fixture
async def pg_server(start_server: StartServer, pg_database_url: str) -> RunningServer:
    """The server on a fresh PostgreSQL database at head."""
    return await start_server(pg_database_url)


@pytest.fixture(params=list(ADMIN_URL_FIXTURES))
def server_database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database at head on each server backend (PostgreSQL, MariaDB). Sync: see
    ``database_url``."""
    url: str = request.getfixturevalue(DATABASE_FIXTURES[request.param][0])
    return url


@pytest.fixture
async def db_server(server_database_url: str, start_server: StartServer) -> RunningServer:
    """The same test against the server on PostgreSQL and on MariaDB."""
    return await start_server(server_database_url)


@pytest.fixture(scope="module", params=list(MODULE_DATABASE_FIXTURES))
def module_database_url(request: pytest.FixtureRequest) -> str:
    """For module-scoped servers: a database at head shared by the module's tests, on each
    server backend in turn. Sync: see ``database_url``."""
    url: str = request.getfixturevalue(MODULE_DATABASE_FIXTURES[request.param])
    return url


@pytest.fixture
async def any_server(database_url: str, start_server: StartServer) -> RunningServer:
    """The same test against PostgreSQL, MariaDB and the embedded SQLite default.

    The database is requested first so that the server stops before it is dropped.
    """
    return await start_server(database_url)
