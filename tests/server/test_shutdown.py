"""Stopping the server while its database stalls.

`FerruleApp.stop(grace)` must return within a bound derived from the grace even when
PostgreSQL accepts connections but answers nothing (a private cluster whose processes
are SIGSTOPped): an open StreamPredictions stream with a commit in flight, RPCs cut off
by their deadline and a queued request log all wait at most the grace before their
connections are dropped and their rows counted. Acknowledged rows are never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from db.migrate import upgrade_to_head
from ferrule.client import AsyncFerruleClient, ClientConfig, FerruleError
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1 import user_service_pb2 as user_pb
from server.app import FerruleApp
from server.telemetry import setup_telemetry
from tests.server import pg_cluster
from tests.server.conftest import ADMIN_TOKEN, make_token, server_settings

GRACE = 1.0
#: Generous on a shared 2-core machine: the point is "bounded", not "fast".
STOP_BOUND = GRACE + 30

pytestmark = pytest.mark.timeout(180)


def _row(i: int) -> pb.Prediction:
    return pb.Prediction(
        subject_id=f"emp-{i}", probability=0.5, model_name="attrition", model_version="v1"
    )


def _request(parent: str, batch_id: str, first: int) -> pb.StreamPredictionsRequest:
    rows = [_row(i) for i in range(first, first + 10)]
    return pb.StreamPredictionsRequest(parent=parent, batch_id=batch_id, predictions=rows)


async def _create_database(cluster: pg_cluster.Cluster) -> None:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute('CREATE DATABASE "ferrule"')
    finally:
        await conn.close()


async def _read_to_the_end(stream: Any) -> None:
    while await stream.read() is not grpc.aio.EOF:
        pass


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


async def test_stop_is_bounded_by_the_grace_while_the_database_stalls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ferrule.request_log")
    with pg_cluster.standalone_cluster() as cluster:
        await _create_database(cluster)
        url = cluster.url("ferrule")
        await upgrade_to_head(url)
        app = FerruleApp(
            server_settings(url, ferrule_grace_seconds=GRACE, database_pool_timeout=2.0),
            telemetry=setup_telemetry(environ={}, set_global=False),
        )
        port = await app.start()
        target = f"127.0.0.1:{port}"
        admin = AsyncFerruleClient(config=ClientConfig(target=target, token=ADMIN_TOKEN))
        org = await admin.users.CreateOrganization(
            user_pb.CreateOrganizationRequest(
                organization=user_pb.Organization(display_name="Stalled")
            )
        )
        org_id = uuid.UUID(org.name.removeprefix("organizations/"))
        client = AsyncFerruleClient(
            config=ClientConfig(target=target, token=make_token(org_id, "read write"))
        )
        frozen: list[int] = []
        stop: asyncio.Task[None] | None = None
        try:
            stream = client.predictions.StreamPredictions(timeout=120)
            await stream.write(_request(org.name, "acked", 0))
            acked = await stream.read()
            assert isinstance(acked, pb.StreamPredictionsResponse)
            assert acked.accepted == 10

            frozen = await asyncio.to_thread(cluster.freeze)
            # A commit that will never be answered, and RPCs the request log records
            # while nothing can write it.
            await stream.write(_request(org.name, "in-flight", 10))
            for _ in range(3):
                with pytest.raises(FerruleError):
                    await admin.users.GetOrganization(
                        user_pb.GetOrganizationRequest(name=org.name), timeout=0.5
                    )

            stop = asyncio.create_task(app.stop(GRACE))
            done, _ = await asyncio.wait({stop}, timeout=STOP_BOUND)
            assert stop in done, f"FerruleApp.stop({GRACE}) still running after {STOP_BOUND} s"
            stop.result()

            # The app really ended: the stream is over and nothing listens on the port.
            with pytest.raises(FerruleError):
                await _read_to_the_end(stream)
            assert not await asyncio.to_thread(_accepts_connections, port)
            # What the request log could not write is counted and said, not lost silently.
            assert app.request_log.dropped + app.request_log.failed_batches > 0
            assert "request log" in caplog.text
        finally:
            pg_cluster.Cluster.thaw(frozen)
            if stop is not None and not stop.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(stop, STOP_BOUND)
            await admin.close()
            await client.close()

        # Acknowledged means committed: the acknowledged batch is stored in full, thawed.
        conn = await asyncpg.connect(cluster.dsn("ferrule"))
        try:
            stored = await conn.fetch(
                "SELECT subject_id FROM predictions WHERE organization_id = $1", org_id
            )
        finally:
            await conn.close()
        subjects = {r["subject_id"] for r in stored}
        assert {f"emp-{i}" for i in range(10)} <= subjects
