"""Scale-out on one machine: `python -m server` with FERRULE_WORKERS=2 on one port.

The workers share the port through SO_REUSEPORT, so the kernel spreads connections, not
calls: each fresh channel (with its own subchannel pool, so that gRPC does not reuse
one connection across channels) lands on one worker, and the worker that answered is
visible from the client side as HealthService.GetHealthReport's process.pid. Data
written through one worker is read through the other (both use the same PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid

import psutil

from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import health_service_pb2, user_service_pb2
from tests.server.conftest import ADMIN_TOKEN
from tests.server.process_helpers import free_port, server_env, start_server_process, wait_serving

WORKERS = 2
CHANNELS = 40  # fresh connections; all on one worker has probability 2 * 2**-40
CONCURRENCY = 10


def fresh_client(target: str) -> AsyncFerruleClient:
    return AsyncFerruleClient(
        config=ClientConfig(
            target=target,
            token=ADMIN_TOKEN,
            default_timeout=20.0,
            options=(("grpc.use_local_subchannel_pool", 1),),
        )
    )


async def serving_pid(client: AsyncFerruleClient) -> int:
    report = await client.health.GetHealthReport(health_service_pb2.GetHealthReportRequest())
    return report.process.pid


async def write_through_fresh_channel(target: str, n: int) -> tuple[int, str]:
    """(worker pid, organization name) of a write through a new connection."""
    async with fresh_client(target) as client:
        pid = await serving_pid(client)
        org = await client.users.CreateOrganization(
            user_service_pb2.CreateOrganizationRequest(
                organization=user_service_pb2.Organization(display_name=f"Scale {n}"),
                request_id=str(uuid.uuid4()),
            )
        )
        assert await serving_pid(client) == pid  # one channel, one connection, one worker
        return pid, org.name


async def read_through_fresh_channel(target: str, name: str) -> tuple[int, str]:
    async with fresh_client(target) as client:
        pid = await serving_pid(client)
        org = await client.users.GetOrganization(user_service_pb2.GetOrganizationRequest(name=name))
        return pid, org.display_name


def stop_tree(proc: subprocess.Popen[bytes], workers: list[psutil.Process]) -> None:
    """SIGTERM the parent (it forwards to the workers); kill what is left of ours."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    if proc.stdout is not None:
        proc.stdout.close()
    if proc.stderr is not None:
        proc.stderr.close()


async def test_two_workers_share_the_load_and_the_data(
    pg_database_url: str, redis_url: str, redis_namespace: str
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = server_env(
        pg_database_url,
        port,
        FERRULE_WORKERS=str(WORKERS),
        REDIS_URL=redis_url,  # the workers share one cache, so invalidation reaches both
        FERRULE_CACHE_PREFIX=redis_namespace,
    )
    proc = start_server_process(env)
    workers: list[psutil.Process] = []
    try:
        await asyncio.to_thread(wait_serving, target)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == WORKERS
        limit = asyncio.Semaphore(CONCURRENCY)

        async def write(n: int) -> tuple[int, str]:
            async with limit:
                return await write_through_fresh_channel(target, n)

        writes = await asyncio.gather(*(write(n) for n in range(CHANNELS)))
        assert {pid for pid, _ in writes} == {w.pid for w in workers}, "load not spread"

        async def read(name: str) -> tuple[int, str]:
            async with limit:
                return await read_through_fresh_channel(target, name)

        reads = await asyncio.gather(*(read(name) for _, name in writes))
        assert [display for _, display in reads] == [f"Scale {n}" for n in range(CHANNELS)]
        crossed = [w for (w, _), (r, _) in zip(writes, reads, strict=True) if w != r]
        assert crossed, "no organization was read through another worker than its writer"
    finally:
        await asyncio.to_thread(stop_tree, proc, workers)
    assert proc.returncode == 0
