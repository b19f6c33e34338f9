"""StreamPredictions shares the ingest budget fairly: a stream whose client stops reading
its acknowledgements blocks only itself (HTTP/2 flow control on that stream), however many
such streams there are, and the process-wide budget counts bytes as well as rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest

from ferrule.v1 import prediction_service_pb2 as pb
from server.services.prediction_stream import (
    MAX_BUFFERED_BYTES,
    MAX_BUFFERED_ROWS,
    MAX_UNACKED_BATCHES,
    IngestBudget,
    ingest_budget,
)
from tests.polling import eventually
from tests.server.conftest import StartServer, make_token
from tests.server.test_prediction_stream import exchange, new_org, request, row, stored

pytestmark = pytest.mark.timeout(240)

#: More streams that never read than the old one-budget-per-process design survived.
STUCK_STREAMS = 12
#: Batches each stuck client tries to send: beyond the server's read-ahead window.
STUCK_BATCHES = 2 * MAX_UNACKED_BATCHES + 2


def stuck_batch(parent: str, batch_id: str) -> pb.StreamPredictionsRequest:
    """One row that is written (so the database shows which batches were committed) and
    999 that are refused: the acknowledgement lists each of them, so one or two unread
    acknowledgements fill the stream's flow-control window."""
    rows = [row(0), *(row(i, probability=2.0) for i in range(1, 1000))]
    return request(parent, batch_id, rows)


async def committed_batches(database_url: str, org: uuid.UUID) -> dict[str, int]:
    """Committed batches per stuck stream ("stuck-{stream}-{n}" request ids)."""
    counts: dict[str, int] = {}
    for record in await stored(database_url, org):
        if record["request_id"].startswith("stuck-"):
            stream, _, _ = record["request_id"].rpartition("-")
            counts[stream] = counts.get(stream, 0) + 1
    return counts


async def test_streams_that_never_read_their_acks_block_only_themselves(
    start_server: StartServer, pg_database_url: str
) -> None:
    # Thirteen streams committing at once queue for connections: on a busy machine that
    # wait, not the behaviour under test, must never end a stream.
    pg_server = await start_server(pg_database_url, database_pool_timeout=120.0)
    org = await new_org(pg_server)
    parent = f"organizations/{org}"
    # No window growth: the stuck clients' receive windows stay at their initial size,
    # so a couple of unread acknowledgements fill them (as for any client that stopped).
    client = pg_server.client(
        make_token(org),
        options=(("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)),
    )
    calls = [client.predictions.StreamPredictions(timeout=200) for _ in range(STUCK_STREAMS)]

    async def send_without_reading(index: int) -> None:
        call = calls[index]
        for n in range(STUCK_BATCHES):
            await call.write(stuck_batch(parent, f"stuck-{index}-{n}"))

    writers = [asyncio.create_task(send_without_reading(i)) for i in range(STUCK_STREAMS)]
    try:
        # Every stuck stream has filled its read-ahead window: the server committed that
        # many of its batches and sent (at most) the acknowledgements its client took.
        async def windows_full() -> bool:
            committed = await committed_batches(pg_server.database_url, org)
            return all(
                committed.get(f"stuck-{i}", 0) >= MAX_UNACKED_BATCHES for i in range(STUCK_STREAMS)
            )

        await eventually(windows_full, what="every stuck stream's window committed")
        # A healthy stream on another connection keeps completing batches meanwhile.
        healthy = pg_server.for_org(org)
        for n in range(5):
            batch = [row(i, name=f"{parent}/predictions/{uuid.uuid4()}") for i in range(1000)]
            acks = await asyncio.wait_for(
                exchange(healthy, [request(parent, f"healthy-{n}", batch)]), timeout=60
            )
            assert [(a.batch_id, a.accepted) for a in acks] == [(f"healthy-{n}", 1000)]
        # The server read and committed each stuck stream's window (acknowledgements
        # unsent do not hold the budget), then stopped reading it: flow control blocked
        # that stream alone.
        committed = await committed_batches(pg_server.database_url, org)
        assert all(committed[f"stuck-{i}"] < STUCK_BATCHES for i in range(STUCK_STREAMS))
    finally:
        for call in calls:
            call.cancel()
        for writer in writers:
            writer.cancel()
        for writer in writers:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await writer
    budget = ingest_budget()
    await eventually(
        lambda: (
            budget.available_rows == MAX_BUFFERED_ROWS
            and budget.available_bytes == MAX_BUFFERED_BYTES
        ),
        what="every cancelled stream returning its share of the ingest budget",
    )


async def test_the_budget_counts_bytes_as_well_as_rows_first_come_first_served() -> None:
    budget = IngestBudget(rows=100, nbytes=1000)
    await budget.acquire(10, 900)
    big = asyncio.create_task(budget.acquire(10, 500))  # enough rows, not enough bytes
    small = asyncio.create_task(budget.acquire(1, 10))  # would fit, but queues behind
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    budget.release(10, 900)
    await eventually(lambda: big.done() and small.done(), what="both waiters served in order")
    assert (budget.available_rows, budget.available_bytes) == (100 - 11, 1000 - 510)


async def test_a_request_larger_than_the_whole_budget_takes_all_of_it() -> None:
    budget = IngestBudget(rows=100, nbytes=1000)
    taken = await budget.acquire(500, 5000)
    assert taken == (100, 1000)
    assert (budget.available_rows, budget.available_bytes) == (0, 0)
    budget.release(*taken)
    assert (budget.available_rows, budget.available_bytes) == (100, 1000)


async def test_a_cancelled_waiter_gives_way_to_the_next() -> None:
    budget = IngestBudget(rows=10, nbytes=10)
    await budget.acquire(10, 1)
    first = asyncio.create_task(budget.acquire(10, 1))
    second = asyncio.create_task(budget.acquire(1, 1))
    await asyncio.sleep(0)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    budget.release(1, 1)
    await eventually(second.done, what="the waiter behind a cancelled one")
