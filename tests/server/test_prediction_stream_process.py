"""StreamPredictions against ``python -m server`` as a subprocess that the tests SIGKILL.

* an acknowledgement is only sent after the commit: kill the server the moment an ack
  arrives, then find every acknowledged row in the database;
* the client helper survives the kill: restart the server on the same port, and the
  helper re-sends what was not acknowledged, leaving every row exactly once;
* a loose memory bound on the server while 100k rows stream through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.client.ingest import AsyncPredictionStreamer
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1 import user_service_pb2 as user_pb
from tests.conftest import query
from tests.server.conftest import ADMIN_TOKEN, JWT_SECRET, make_token

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
#: The stated bound for the memory test: the server's RSS while 100k rows stream in.
RSS_BOUND_MIB = 400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``python -m server`` on a fixed port; start, SIGKILL and start again."""

    def __init__(self, database_url: str, port: int) -> None:
        self.database_url = database_url
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        env = {
            **os.environ,
            "FERRULE_LISTEN": self.target,
            "DATABASE_URL": self.database_url,
            "FERRULE_JWT_SECRET": JWT_SECRET,
            "FERRULE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FERRULE_LOG_LEVEL": "ERROR",
        }
        self.process = subprocess.Popen(  # noqa: ASYNC220 (its output is read off-loop)
            [sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, self.process.stdout.readline), 60)
        assert b"serving on" in line, line

    def kill(self) -> None:
        """SIGKILL: no grace, no flush, no shutdown hooks."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.close_pipe()

    def close_pipe(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def client(self, token: str) -> AsyncFerruleClient:
        return AsyncFerruleClient(
            config=ClientConfig(target=self.target, token=token, default_timeout=60.0)
        )


async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    process = ServerProcess(database_url, free_port())
    await process.start()
    yield process
    process.kill()


@pytest.fixture
async def server(server_database_url: str) -> AsyncIterator[ServerProcess]:
    """The server process on PostgreSQL and on MariaDB."""
    async for process in serve(server_database_url):
        yield process


@pytest.fixture
async def pg_process(pg_database_url: str) -> AsyncIterator[ServerProcess]:
    async for process in serve(pg_database_url):
        yield process


async def new_org(server: ServerProcess) -> uuid.UUID:
    async with server.client(ADMIN_TOKEN) as admin:
        org = await admin.users.CreateOrganization(
            user_pb.CreateOrganizationRequest(organization=user_pb.Organization(display_name="k"))
        )
    return uuid.UUID(org.name.removeprefix("organizations/"))


def rows(start: int, count: int) -> list[pb.Prediction]:
    out = []
    for i in range(start, start + count):
        message = pb.Prediction(
            subject_id=f"emp-{i}", probability=(i % 1000) / 1000, model_version="v1"
        )
        message.features.update({"i": i, "band": "B2"})
        out.append(message)
    return out


@pytest.mark.parametrize("kill_after_acks", [1, 5])
async def test_acknowledged_rows_survive_a_kill_right_after_the_ack(
    server: ServerProcess, kill_after_acks: int
) -> None:
    org = await new_org(server)
    parent = f"organizations/{org}"
    acked: dict[str, int] = {}
    client = server.client(make_token(org))
    try:
        call = client.predictions.StreamPredictions(timeout=60)

        async def send() -> None:
            for n in range(40):
                await call.write(
                    pb.StreamPredictionsRequest(
                        parent=parent, batch_id=f"k-{n}", predictions=rows(n * 250, 250)
                    )
                )

        sender = asyncio.create_task(send())
        with contextlib.suppress(Exception):
            while len(acked) < kill_after_acks:
                ack = await call.read()
                assert isinstance(ack, pb.StreamPredictionsResponse)
                acked[ack.batch_id] = ack.accepted
        server.kill()  # before anything else: the ack must already be durable
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        call.cancel()
    finally:
        await client.close(grace=0)

    assert len(acked) == kill_after_acks
    counts = {
        r.request_id: r.n
        for r in await query(
            server.database_url,
            "SELECT request_id, count(*) AS n FROM predictions"
            " WHERE organization_id = :org GROUP BY request_id",
            org=org,
        )
    }
    for batch_id, accepted in acked.items():
        assert accepted == 250
        assert counts.get(batch_id) == accepted, f"acknowledged batch {batch_id} not durable"


def expected_ids(parent: str, prefix: str, total: int, batch_size: int) -> Iterator[uuid.UUID]:
    for i in range(total):
        batch, index = divmod(i, batch_size)
        yield uuid.uuid5(uuid.NAMESPACE_URL, f"{parent}/streamBatches/{prefix}-{batch}/{index}")


def md5_of(ids: Iterator[uuid.UUID] | list[uuid.UUID]) -> str:
    return hashlib.md5("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()


async def test_helper_resumes_after_the_server_is_killed(server: ServerProcess) -> None:
    org = await new_org(server)
    parent = f"organizations/{org}"
    total, batch_size = 30_000, 500
    acks = 0
    killed = asyncio.Event()

    def on_ack(_: pb.StreamPredictionsResponse) -> None:
        nonlocal acks
        acks += 1
        if acks == 12 and not killed.is_set():
            server.kill()
            killed.set()

    client = server.client(make_token(org))
    streamer = AsyncPredictionStreamer(
        client,
        parent,
        batch_size=batch_size,
        batch_id_prefix="resume",
        max_attempts=30,
        initial_backoff=0.05,
        max_backoff=0.5,
        on_ack=on_ack,
    )

    async def restart() -> None:
        await killed.wait()
        await server.start()

    restarter = asyncio.create_task(restart())
    try:
        for start in range(0, total, 1000):
            await streamer.add_many(rows(start, 1000))
        totals = await asyncio.wait_for(streamer.close(), 60)
        await restarter
    finally:
        restarter.cancel()
        await client.close(grace=0)

    assert killed.is_set() and totals.reconnects >= 1
    assert totals.accepted + totals.duplicates == total and not totals.rejected
    stored = await query(
        server.database_url,
        "SELECT id, probability FROM predictions WHERE organization_id = :org",
        org=org,
    )
    assert len(stored) == total
    assert md5_of([r.id for r in stored]) == md5_of(
        expected_ids(parent, "resume", total, batch_size)
    )
    assert sum(r.probability for r in stored) == pytest.approx(
        sum((i % 1000) / 1000 for i in range(total))
    )


async def test_server_memory_stays_bounded_while_streaming(pg_process: ServerProcess) -> None:
    server = pg_process
    org = await new_org(server)
    process = psutil.Process(server.pid)
    start_rss = process.memory_info().rss
    peak = start_rss
    total = 100_000

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    client = server.client(make_token(org))
    try:
        async with AsyncPredictionStreamer(client, f"organizations/{org}") as streamer:
            for start in range(0, total, 1000):
                await streamer.add_many(rows(start, 1000))
        assert streamer.totals.accepted == total
    finally:
        sampler.cancel()
        await client.close(grace=0)
    growth = (peak - start_rss) / MiB
    assert peak / MiB < RSS_BOUND_MIB, (
        f"peak RSS {peak / MiB:.0f} MiB (start {start_rss / MiB:.0f})"
    )
    assert growth < RSS_BOUND_MIB / 2, f"RSS grew by {growth:.0f} MiB"
