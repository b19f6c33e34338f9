"""What every benchmark scenario needs: a fresh database, a server subprocess, RSS samples.

Scenarios measure the real process (``python -m server``) over the real client, so the
figures include gRPC, serialization and the event loop, as production pays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncmy
import asyncpg
import jwt
import psutil
from sqlalchemy.engine import make_url

from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import user_service_pb2 as user_pb

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL",
    os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"),
)
MARIADB_ADMIN_URL = os.environ.get(
    "BENCH_MARIADB_URL",
    os.environ.get("TEST_MARIADB_URL", "mariadb+asyncmy://root@127.0.0.1:3306/test"),
)
JWT_SECRET = "bench-jwt-secret-" + "b" * 32
ADMIN_TOKEN = "bench-admin-token-" + "a" * 16


def driverless(url: str) -> str:
    """asyncpg wants ``postgresql://``; SQLAlchemy wants ``postgresql+asyncpg://``."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def org_token(organization: uuid.UUID, scope: str = "read write", ttl: float = 6 * 3600) -> str:
    expires = int(time.time() + ttl)
    claims = {"sub": "bench", "org": str(organization), "scope": scope, "exp": expires}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@contextlib.asynccontextmanager
async def fresh_database(prefix: str = "ferrule_bench") -> AsyncIterator[str]:
    """Create an empty database, migrate it to head, yield its URL, drop it afterwards."""
    from db.migrate import upgrade_to_head

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    base = ADMIN_DATABASE_URL.rpartition("/")[0]
    admin = await asyncpg.connect(driverless(ADMIN_DATABASE_URL))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"{base}/{name}"
    try:
        await upgrade_to_head(url)
        yield url
    finally:
        admin = await asyncpg.connect(driverless(ADMIN_DATABASE_URL))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def mariadb_connection(url: str, database: str | None = None) -> asyncmy.Connection:
    """A plain asyncmy connection (UTC session) to the server of ``url``."""
    parsed = make_url(url)
    return await asyncmy.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        db=database,
        init_command="SET time_zone = '+00:00'",
    )


@contextlib.asynccontextmanager
async def fresh_mariadb_database(prefix: str = "ferrule_bench") -> AsyncIterator[str]:
    """:func:`fresh_database` on MariaDB (``BENCH_MARIADB_URL``)."""
    from db.migrate import upgrade_to_head

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await mariadb_connection(MARIADB_ADMIN_URL)
    try:
        async with admin.cursor() as cursor:
            await cursor.execute(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
            )
    finally:
        admin.close()
    url = f"{MARIADB_ADMIN_URL.rpartition('/')[0]}/{name}"
    try:
        await upgrade_to_head(url)
        yield url
    finally:
        admin = await mariadb_connection(MARIADB_ADMIN_URL)
        try:
            async with admin.cursor() as cursor:
                await cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            admin.close()


@dataclass
class RssSampler:
    """Samples a process's resident set size in the background."""

    pid: int
    interval: float = 0.1
    samples: list[int] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def sample(self) -> int:
        rss = psutil.Process(self.pid).memory_info().rss
        self.samples.append(rss)
        return rss

    def start(self) -> None:
        self.samples.clear()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(psutil.Error):
            while True:
                self.sample()
                await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(psutil.Error):
            self.sample()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


@dataclass
class ServerProcess:
    """``python -m server`` on a free port, its pid, and clients for it."""

    process: subprocess.Popen[bytes]
    target: str
    database_url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def client(self, token: str = ADMIN_TOKEN) -> AsyncFerruleClient:
        config = ClientConfig(target=self.target, token=token, default_timeout=120.0)
        return AsyncFerruleClient(config=config)

    async def create_organization(self, display_name: str = "bench") -> uuid.UUID:
        async with self.client() as admin:
            org = await admin.users.CreateOrganization(
                user_pb.CreateOrganizationRequest(
                    organization=user_pb.Organization(display_name=display_name)
                )
            )
        return uuid.UUID(org.name.removeprefix("organizations/"))


def server_process(
    database_url: str, module: str = "server", **env: str
) -> contextlib.AbstractAsyncContextManager[ServerProcess]:
    """Start ``python -m {module}`` (the server, or a bench wrapper of it) as a subprocess;
    SIGTERM it (then SIGKILL) afterwards."""
    return server_process_in(ROOT, database_url, module, **env)


@contextlib.asynccontextmanager
async def server_process_in(
    tree: Path, database_url: str, module: str = "server", **env: str
) -> AsyncIterator[ServerProcess]:
    """:func:`server_process` running the code of ``tree``, a checkout of this repository
    (another revision's worktree for an A/B comparison: its directory comes first on the
    module path)."""
    port = free_port()
    environment = {
        **os.environ,
        "FERRULE_LISTEN": f"127.0.0.1:{port}",
        "DATABASE_URL": database_url,
        "FERRULE_JWT_SECRET": JWT_SECRET,
        "FERRULE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FERRULE_LOG_LEVEL": "WARNING",
        **env,
    }
    process = subprocess.Popen(  # noqa: ASYNC220 (started once; its output read off-loop)
        [sys.executable, "-m", module],
        cwd=tree,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    try:
        assert process.stdout is not None
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, process.stdout.readline), 60)
        if b"serving on" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        yield ServerProcess(process, f"127.0.0.1:{port}", database_url)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.get_running_loop().run_in_executor(None, process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
