"""The request log's writer (server/request_log.py): full batches are written back to
back, so how fast it logs is bounded by the database and not by its flush interval; and
when the server stops, what it was writing and what is queued lands in the table within
the grace, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from db.engine import Database
from db.repositories.request_log import LoggedCall, insert_request_log
from server.request_log import RequestLogWriter
from tests.polling import eventually


def _entry(n: int) -> LoggedCall:
    return LoggedCall(
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

    async def slow_database(entries: list[LoggedCall]) -> None:
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


async def test_full_batches_are_written_without_waiting_the_flush_interval() -> None:
    batches: list[list[LoggedCall]] = []

    async def write(batch: list[LoggedCall]) -> None:
        batches.append(batch)

    writer = RequestLogWriter(write, max_batch=10, flush_interval=3600)
    writer.start()
    try:
        for number in range(25):
            writer.record(_entry(number))
        await eventually(lambda: len(batches) == 2, what="two full batches written")
        await asyncio.sleep(0.05)
        assert [len(batch) for batch in batches] == [10, 10]  # the rest waits its interval
        assert [e.peer for batch in batches for e in batch] == [
            f"ipv4:127.0.0.1:{10_000 + number}" for number in range(20)
        ]
    finally:
        await writer.stop(grace=1)
    assert writer.written == 25
    assert writer.dropped == 0
