"""The server process: `make run`, configuration errors, schema checks, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from ferrule.client import AsyncFerruleClient, ClientConfig, FerruleError
from ferrule.v1 import user_service_pb2 as pb
from tests.polling import eventually
from tests.server.conftest import ADMIN_TOKEN
from tests.server.process_helpers import (
    REPO,
    free_port,
    server_env,
    start_server_process,
    wait_serving,
)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_make_run_on_a_fresh_checkout_serves_health(tmp_path: Path) -> None:
    """`make run` in a copy of the tracked files (no database yet) answers SERVING."""
    checkout = tmp_path / "checkout"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / name.decode()
        if source.is_file():
            target = checkout / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRULE_", "DATABASE_"))}
    env["FERRULE_LISTEN"] = f"127.0.0.1:{port}"
    # Reuse this checkout's environment (installing it is what `make setup` does in CI);
    # -o marks its stamp as up to date so make never reinstalls the shared venv from here.
    venv = REPO / ".venv"
    proc = subprocess.Popen(
        ["make", "-o", f"{venv}/.runtime-stamp", "run", f"VENV={venv}"],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=120)
        assert (checkout / "ferrule.db").exists(), "the embedded default is a SQLite file"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_bad_configuration_fails_fast_with_the_variable_name() -> None:
    env = server_env("postgres://nope", free_port(), FERRULE_WORKERS="zero")
    proc = subprocess.run(
        [sys.executable, "-m", "server"], env=env, cwd=REPO, capture_output=True, timeout=60
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "DATABASE_URL" in err
    assert "FERRULE_WORKERS" in err
    assert "Traceback" not in err


async def test_refuses_an_outdated_schema_unless_told_to_migrate(
    empty_pg_database_url: str,
) -> None:
    env = server_env(empty_pg_database_url, free_port(), FERRULE_MIGRATE_ON_START="0")
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert b"alembic upgrade head" in proc.stderr


async def test_sigterm_during_a_burst_keeps_every_acknowledged_write(
    pg_database_url: str,
) -> None:
    port = free_port()
    proc = start_server_process(server_env(pg_database_url, port, FERRULE_GRACE_SECONDS="5"))
    try:
        await asyncio.to_thread(wait_serving, f"127.0.0.1:{port}")
        config = ClientConfig(target=f"127.0.0.1:{port}", token=ADMIN_TOKEN, max_attempts=1)
        async with AsyncFerruleClient(config=config) as client:
            acknowledged: list[str] = []

            async def create(i: int) -> None:
                try:
                    org = await client.users.CreateOrganization(
                        pb.CreateOrganizationRequest(
                            organization=pb.Organization(display_name=f"burst {i}")
                        )
                    )
                    acknowledged.append(org.name)
                except FerruleError:
                    pass  # refused once shutdown began: allowed, but never half-written

            tasks = [asyncio.create_task(create(i)) for i in range(300)]
            # SIGTERM lands mid-burst, after the first acknowledged write.
            await eventually(lambda: acknowledged, what="a first acknowledged write")
            proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)
        # Bounded by the grace period (5 s) plus a generous allowance for teardown.
        code = await asyncio.to_thread(proc.wait, 5 + 55)
        assert code == 0
    finally:
        _stop(proc)
    assert acknowledged, "some calls must have succeeded before SIGTERM"
    conn = await asyncpg.connect(pg_database_url.replace("+asyncpg", ""))
    try:
        stored = {
            f"organizations/{row['id']}" for row in await conn.fetch("SELECT id FROM organizations")
        }
    finally:
        await conn.close()
    assert set(acknowledged) <= stored


def test_several_workers_without_a_shared_cache_are_refused() -> None:
    env = server_env("sqlite+aiosqlite:///unused.db", free_port(), FERRULE_WORKERS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "server"], env=env, cwd=REPO, capture_output=True, timeout=60
    )
    assert proc.returncode == 2
    assert "REDIS_URL" in proc.stderr.decode()


@pytest.mark.parametrize("workers", [2])
async def test_workers_share_one_port(
    pg_database_url: str, redis_url: str, redis_namespace: str, workers: int
) -> None:
    port = free_port()
    env = server_env(
        pg_database_url,
        port,
        FERRULE_WORKERS=str(workers),
        REDIS_URL=redis_url,
        FERRULE_CACHE_PREFIX=redis_namespace,
    )
    proc = start_server_process(env)
    try:
        await asyncio.to_thread(wait_serving, f"127.0.0.1:{port}")
        import psutil

        children = psutil.Process(proc.pid).children()
        assert len(children) == workers
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        _stop(proc)


async def test_a_stop_signal_during_start_up_drains_every_worker(
    pg_database_url: str, redis_url: str, redis_namespace: str
) -> None:
    """SIGTERM as soon as the workers exist, before any of them serves: each one still
    shuts down cleanly (the signal waits for its handler), so the supervisor exits 0."""
    import psutil

    env = server_env(
        pg_database_url,
        free_port(),
        FERRULE_WORKERS="2",
        FERRULE_MIGRATE_ON_START="0",
        REDIS_URL=redis_url,
        FERRULE_CACHE_PREFIX=redis_namespace,
    )
    proc = start_server_process(env)
    try:
        supervisor = psutil.Process(proc.pid)
        await eventually(
            lambda: len(supervisor.children()) == 2, what="two forked workers", interval=0.001
        )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        _stop(proc)
    assert proc.stderr is not None
    assert b"worker failed" not in proc.stderr.read()


def test_a_worker_killed_by_a_signal_is_reported_as_a_shell_would() -> None:
    from server.__main__ import shell_status

    assert shell_status(-signal.SIGKILL) == 128 + signal.SIGKILL
    assert shell_status(0) == 0
    assert shell_status(3) == 3


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_event_loop_is_uvloop_unless_told_otherwise(tmp_path: Path, loop: str) -> None:
    env = server_env(f"sqlite+aiosqlite:///{tmp_path}/loop.db", free_port())
    if loop == "asyncio":
        env["FERRULE_EVENT_LOOP"] = "asyncio"
    proc = start_server_process(env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert b"serving on" in line, line
        assert f"{loop} loop)".encode() in line
        wait_serving(env["FERRULE_LISTEN"], timeout=30)
    finally:
        _stop(proc)


def test_gc_is_tuned_after_start_up() -> None:
    from server.__main__ import tune_gc
    from server.settings import Settings

    before = gc.get_threshold()
    try:
        tune_gc(Settings(ferrule_gc_gen0_threshold=12_345))
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 0  # start-up objects are out of the collector's reach
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
