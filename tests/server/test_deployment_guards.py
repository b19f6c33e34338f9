"""Deployment guard rails: settings that would quietly weaken a production server are
refused at start-up or warned about, and the production server options are applied."""

from __future__ import annotations

import logging
import subprocess
import sys

import pydantic
import pytest
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from db.search_sql import PG_MARK_MATCH_LEAKPROOF, PG_MATCH_FUNCTION
from server.app import FerruleApp, InsecureListenError, grpc_options
from server.settings import Settings, is_loopback
from server.telemetry import setup_telemetry
from tests.server.conftest import RunningServer, StartServer, server_settings
from tests.server.process_helpers import REPO, free_port, server_env
from tests.server.reflection_status import reflection_status


@pytest.mark.parametrize("host", ["127.0.0.1", "127.10.0.1", "localhost", "[::1]"])
def test_plaintext_on_loopback_needs_nothing(host: str) -> None:
    assert is_loopback(host)
    assert Settings(ferrule_listen=f"{host}:50051").plaintext_refusal() is None


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3", "ferrule.internal"])
def test_plaintext_elsewhere_is_refused_without_an_explicit_opt_in(host: str) -> None:
    refusal = Settings(ferrule_listen=f"{host}:50051").plaintext_refusal()
    assert refusal is not None
    assert "FERRULE_ALLOW_INSECURE" in refusal and "FERRULE_TLS_CERT_FILE" in refusal
    allowed = Settings(ferrule_listen=f"{host}:50051", ferrule_allow_insecure=True)
    assert allowed.plaintext_refusal() is None


PG = "postgresql+asyncpg://ferrule@db.internal/ferrule"
MARIADB = "mariadb+asyncmy://ferrule@db.internal/ferrule"


@pytest.mark.parametrize(
    ("primary", "replicas", "message"),
    [
        (PG, "postgres://ferrule@replica/ferrule", "must start with"),
        (PG, f"{PG},mysql://ferrule@replica/ferrule", "must start with"),
        (PG, MARIADB, "replicas of a PostgreSQL primary are PostgreSQL too"),
        (MARIADB, PG, "replicas of a MariaDB/MySQL primary are MariaDB/MySQL too"),
        ("sqlite+aiosqlite:///./ferrule.db", PG, "the embedded SQLite has no replicas"),
    ],
)
def test_replica_urls_name_the_primarys_backend(primary: str, replicas: str, message: str) -> None:
    """A replica is refused with the setting's name when the server starts, not by a
    driver error when its engine is built."""
    with pytest.raises(pydantic.ValidationError, match=message):
        Settings(database_url=primary, database_replica_urls=replicas)


def test_replicas_of_the_same_backend_are_accepted() -> None:
    replica = "mysql+asyncmy://ferrule@replica/ferrule"
    settings = Settings(database_url=MARIADB, database_replica_urls=f"{MARIADB}, {replica}")
    assert settings.database_replica_urls == [MARIADB, replica]


async def test_the_app_refuses_to_serve_plaintext_on_a_public_address(
    sqlite_database_url: str,
) -> None:
    settings = server_settings(sqlite_database_url, ferrule_listen="0.0.0.0:0")
    app = FerruleApp(settings, telemetry=setup_telemetry(environ={}, set_global=False))
    try:
        with pytest.raises(InsecureListenError):
            await app.start()
        assert app.server is None
    finally:
        await app.stop(grace=0)


def test_the_server_process_refuses_to_start_on_a_public_plaintext_address(
    sqlite_database_url: str,
) -> None:
    """`python -m server` itself stops, naming the variables, before binding anything."""
    env = server_env(sqlite_database_url, free_port())
    env["FERRULE_LISTEN"] = f"0.0.0.0:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "FERRULE_ALLOW_INSECURE" in done.stderr
    # Commands that listen on nothing are not refused: the migration Job shares the
    # serving container's environment.
    migrate = subprocess.run(
        [sys.executable, "-m", "server", "migrate"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr


async def test_postgresql_without_an_app_role_warns_that_rls_is_not_enforced(
    start_server: StartServer, pg_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ferrule.app"):
        await start_server(pg_database_url)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ferrule.app"]
    assert any("DATABASE_APP_ROLE" in w and "row-level security" in w for w in warnings)


async def test_no_rls_warning_with_an_app_role_or_on_sqlite(
    start_server: StartServer,
    pg_database_url: str,
    sqlite_database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ferrule.app"):
        await start_server(pg_database_url, database_app_role="ferrule_app")
        await start_server(sqlite_database_url)
    assert not [r for r in caplog.records if "DATABASE_APP_ROLE" in r.getMessage()]
    # The suite's databases were migrated by a superuser: the search can use its index.
    assert not [r for r in caplog.records if PG_MARK_MATCH_LEAKPROOF in r.getMessage()]


async def test_rls_without_a_leakproof_match_function_warns_that_search_is_unindexed(
    start_server: StartServer, pg_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A database migrated by a role that could not mark ``ts_match_vq`` (or restored
    into a new cluster): the server names the command a superuser runs."""
    owner = create_async_engine(pg_database_url, poolclass=pool.NullPool)
    try:
        async with owner.begin() as conn:
            await conn.exec_driver_sql(f"ALTER FUNCTION {PG_MATCH_FUNCTION} NOT LEAKPROOF")
    finally:
        await owner.dispose()
    with caplog.at_level(logging.WARNING, logger="ferrule.app"):
        await start_server(pg_database_url, database_app_role="ferrule_app")
    warnings = [r.getMessage() for r in caplog.records if r.name == "ferrule.app"]
    assert any(PG_MARK_MATCH_LEAKPROOF in w and "SearchAnalyses" in w for w in warnings)


async def test_recording_sql_parameters_on_spans_is_announced(
    start_server: StartServer, sqlite_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ferrule.app"):
        await start_server(sqlite_database_url, ferrule_trace_sql_params=True)
    assert any("FERRULE_TRACE_SQL_PARAMS" in r.getMessage() for r in caplog.records)


def test_production_connection_options_reach_grpc() -> None:
    options = dict(
        grpc_options(
            Settings(
                ferrule_max_streams_per_connection=7,
                ferrule_keepalive_seconds=30,
                ferrule_max_connection_age_seconds=600,
                ferrule_max_connection_age_grace_seconds=20,
            )
        )
    )
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 20_000
    unlimited = dict(grpc_options(Settings(ferrule_max_connection_age_seconds=0)))
    assert "grpc.max_connection_age_ms" not in unlimited


async def test_reflection_can_be_switched_off(
    start_server: StartServer, sqlite_database_url: str
) -> None:
    import grpc

    server: RunningServer = await start_server(sqlite_database_url, ferrule_reflection=False)

    async with grpc.aio.insecure_channel(server.target) as channel:
        assert await reflection_status(channel) == grpc.StatusCode.UNIMPLEMENTED
