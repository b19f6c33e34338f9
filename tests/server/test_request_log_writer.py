"""The request log's writer (server/request_log.py) when the server stops: what it was
writing and what is queued lands in the table within the grace; on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from db.engine import Database
from db.repositories.request_log import insert_request_log
from server.request_log import RequestLogEntry, RequestLogWriter


def _entry(n: int) -> RequestLogEntry:
    return RequestLogEntry(
        method="/ferrule.v1.UserService/GetUser",
        caller=None,
        organization_id=None,
        peer=f"ipv4:127.0.0.1:{10_000 + n}",
        user_agent=None,
        status_code="OK",
        latency_ms=1.0,
        request_bytes=10,
        trace_id=None,
        create_time=datetime.now(UTC),
    )


async def _rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM request_log")
        return count
    finally:
        await conn.close()


async def test_a_batch_being_written_when_the_writer_stops_is_written_not_dropped(
    pg_database_url: str,
) -> None:
    database = Database.from_url(pg_database_url)
    writing = asyncio.Event()
    answer = asyncio.Event()

    async def slow_database(entries: list[RequestLogEntry]) -> None:
        writing.set()
        await answer.wait()  # the database takes its time over this batch
        await insert_request_log(database, entries)

    writer = RequestLogWriter(slow_database, flush_interval=0, max_batch=5)
    writer.start()
    try:
        for n in range(5):
            writer.record(_entry(n))
        await asyncio.wait_for(writing.wait(), 10)
        for n in range(5, 8):
            writer.record(_entry(n))  # queued behind the batch under way
        stopping = asyncio.create_task(writer.stop(grace=10))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waiting for the batch, not cancelling it
        answer.set()
        await asyncio.wait_for(stopping, 20)
        assert (writer.written, writer.dropped, writer.failed_batches) == (8, 0, 0)
        assert await _rows(pg_database_url) == 8
    finally:
        answer.set()
        await writer.stop(grace=1)
        await database.dispose()
