"""The streaming helper (ferrule.client.ingest) against a scripted fake PredictionService.

The fake stores each batch id once (like the server) and can fail a stream at a chosen
point, so the tests pin down the helper's own contract: the window of unacknowledged
batches, acks matched in order, every unacknowledged batch re-sent unchanged after a
failure, totals that add up, errors that are not retried, and the blocking twin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc import aio

from ferrule.client import AsyncFerruleClient, ClientConfig, InvalidArgument
from ferrule.client.ingest import (
    AckMismatch,
    AsyncPredictionStreamer,
    PredictionStreamer,
    StreamBroken,
)
from ferrule.v1 import common_pb2, prediction_service_pb2_grpc
from ferrule.v1 import prediction_service_pb2 as pb
from tests.client.servers import ServerThread

pytestmark = pytest.mark.timeout(30)
PARENT = "organizations/00000000-0000-4000-8000-000000000001"


@dataclass
class Plan:
    """What one stream (by its number) does when it has received ``at`` batches."""

    at: int
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    #: Store the batch before failing (a commit whose ack was lost).
    store_first: bool = False
    #: Acknowledge with a wrong batch id instead of failing.
    wrong_ack: bool = False


@dataclass
class FakeIngest(prediction_service_pb2_grpc.PredictionServiceServicer):
    plans: dict[int, Plan] = field(default_factory=dict)
    #: Acknowledge only once this many batches are outstanding (or the input ends).
    hold: int = 1
    streams: int = 0
    #: (stream number, batch id, row subjects) of every batch received.
    received: list[tuple[int, str, tuple[str, ...]]] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)
    max_outstanding: int = 0

    def ack(self, request: pb.StreamPredictionsRequest) -> pb.StreamPredictionsResponse:
        rejected = [
            pb.RejectedPrediction(
                index=i,
                violations=[
                    common_pb2.FieldViolation(
                        field="probability", description="must be within [0, 1]", reason="X"
                    )
                ],
            )
            for i, p in enumerate(request.predictions)
            if p.probability > 1
        ]
        valid = len(request.predictions) - len(rejected)
        fresh = request.batch_id not in self.stored
        self.stored.setdefault(request.batch_id, valid)
        return pb.StreamPredictionsResponse(
            batch_id=request.batch_id,
            accepted=valid if fresh else 0,
            duplicates=0 if fresh else valid,
            rejected=rejected,
        )

    async def StreamPredictions(
        self,
        request_iterator: AsyncIterator[pb.StreamPredictionsRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamPredictionsResponse]:
        number = self.streams
        self.streams += 1
        plan = self.plans.get(number)
        outstanding: list[pb.StreamPredictionsRequest] = []
        count = 0
        async for request in request_iterator:
            count += 1
            self.received.append(
                (number, request.batch_id, tuple(p.subject_id for p in request.predictions))
            )
            if plan is not None and count == plan.at:
                if plan.wrong_ack:
                    yield pb.StreamPredictionsResponse(batch_id="not-" + request.batch_id)
                    return
                if plan.store_first:
                    self.ack(request)
                await context.abort(plan.code, "planned failure")
            outstanding.append(request)
            self.max_outstanding = max(self.max_outstanding, len(outstanding))
            if len(outstanding) >= self.hold:
                for held in outstanding:
                    yield self.ack(held)
                outstanding.clear()
        for held in outstanding:
            yield self.ack(held)


@pytest.fixture
def fake() -> FakeIngest:
    return FakeIngest()  # type: ignore[abstract]  # the other RPCs stay unimplemented


@pytest.fixture
def target(fake: FakeIngest) -> Iterator[str]:
    def register(server: aio.Server) -> None:
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(fake, server)

    with ServerThread(register) as running:
        yield running.target


@pytest.fixture
async def client(target: str) -> AsyncIterator[AsyncFerruleClient]:
    async with AsyncFerruleClient(target) as client:
        yield client


def rows(start: int, count: int, bad: frozenset[int] = frozenset()) -> list[pb.Prediction]:
    return [
        pb.Prediction(subject_id=f"s{i}", probability=2.0 if i in bad else 0.5, model_version="v1")
        for i in range(start, start + count)
    ]


def streamer(client: AsyncFerruleClient, **options: Any) -> AsyncPredictionStreamer:
    defaults: dict[str, Any] = {"batch_size": 100, "initial_backoff": 0.01, "max_backoff": 0.05}
    return AsyncPredictionStreamer(client, PARENT, **{**defaults, **options})


async def test_window_batches_and_totals(client: AsyncFerruleClient, fake: FakeIngest) -> None:
    fake.hold = 4  # acks only when 4 batches wait: the helper must stop at its window
    acks: list[str] = []
    helper = streamer(
        client, max_in_flight=4, batch_id_prefix="w", on_ack=lambda a: acks.append(a.batch_id)
    )
    await helper.add_many(rows(0, 2450, bad=frozenset({7, 2401})))
    totals = await helper.close()
    assert fake.max_outstanding == 4
    assert acks == [f"w-{n}" for n in range(25)]  # 24 full batches and a partial one
    assert (totals.accepted, totals.duplicates, totals.batches) == (2448, 0, 25)
    assert [(r.batch_id, r.index, r.row_number) for r in totals.rejected] == [
        ("w-0", 7, 7),
        ("w-24", 1, 2401),
    ]
    assert totals.rejected[0].violations == (("probability", "must be within [0, 1]", "X"),)
    assert totals.rows == 2450 and totals.reconnects == 0


@pytest.mark.parametrize("store_first", [False, True])
async def test_unacknowledged_batches_are_resent_unchanged(
    client: AsyncFerruleClient, fake: FakeIngest, store_first: bool
) -> None:
    fake.plans = {0: Plan(at=6, store_first=store_first), 1: Plan(at=3)}
    helper = streamer(client, batch_id_prefix="r")
    await helper.add_many(rows(0, 2000))
    totals = await helper.close()

    assert totals.reconnects == 2
    assert totals.accepted + totals.duplicates == 2000
    # Acks in flight when a stream fails may be lost: those batches come back as
    # duplicates. A batch stored before the failure always does.
    assert totals.duplicates % 100 == 0
    assert totals.duplicates >= (100 if store_first else 0)
    assert sorted(fake.stored) == sorted(f"r-{n}" for n in range(20))
    numbers: dict[int, list[int]] = {}
    for stream, batch_id, _ in fake.received:
        numbers.setdefault(stream, []).append(int(batch_id.removeprefix("r-")))
    assert sorted(numbers) == [0, 1, 2]
    for sent in numbers.values():  # each stream: consecutive batches, in order
        assert sent == list(range(sent[0], sent[0] + len(sent)))
    # A new stream starts at or before the batch that failed the previous one.
    assert numbers[0][0] == 0 and numbers[1][0] <= 5 and numbers[2][0] <= numbers[1][2]
    by_id: dict[str, set[tuple[str, ...]]] = {}
    for _, batch_id, subjects in fake.received:
        by_id.setdefault(batch_id, set()).add(subjects)
    assert all(len(versions) == 1 for versions in by_id.values())  # never re-cut


async def test_errors_that_retrying_cannot_fix_surface(
    client: AsyncFerruleClient, fake: FakeIngest
) -> None:
    # Every stream refuses its 2nd batch. grpc.aio may report a write that races the
    # refusal as a local INTERNAL (the true status lost); the helper retries those, so
    # the true code surfaces on some attempt.
    fake.plans = {n: Plan(at=2, code=grpc.StatusCode.INVALID_ARGUMENT) for n in range(20)}
    helper = streamer(client, max_attempts=20)

    async def send_all() -> None:
        await helper.add_many(rows(0, 500))
        await helper.flush()

    with pytest.raises(InvalidArgument):
        await send_all()
    streams = fake.streams
    with pytest.raises(InvalidArgument):  # and it stays failed
        await helper.add_many(rows(0, 100))
    assert fake.streams == streams < 20


async def test_gives_up_after_attempts_without_progress(
    client: AsyncFerruleClient, fake: FakeIngest
) -> None:
    fake.plans = {n: Plan(at=1) for n in range(10)}
    helper = streamer(client, max_attempts=3)
    await helper.add_many(rows(0, 100))
    with pytest.raises(StreamBroken) as raised:
        await helper.flush()
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE
    assert fake.streams == 3


async def test_an_acknowledgement_out_of_order_is_an_error(
    client: AsyncFerruleClient, fake: FakeIngest
) -> None:
    fake.plans = {0: Plan(at=1, wrong_ack=True)}
    helper = streamer(client)
    await helper.send_batch(rows(0, 3), batch_id="mine")
    with pytest.raises(AckMismatch, match="expected 'mine'") as raised:
        await helper.flush()
    assert raised.value.code is grpc.StatusCode.INTERNAL
    assert fake.streams == 1  # a protocol violation is not retried


async def test_empty_flush_and_explicit_batch_ids(client: AsyncFerruleClient) -> None:
    helper = streamer(client)
    assert (await helper.flush()).batches == 0
    assert await helper.send_batch([], batch_id="heartbeat") == "heartbeat"
    await helper.add_many(rows(0, 5))
    totals = await helper.close()
    assert (totals.batches, totals.accepted) == (2, 5)


def test_blocking_streamer(target: str, fake: FakeIngest) -> None:
    fake.plans = {0: Plan(at=3)}
    config = ClientConfig(target=target)
    with PredictionStreamer(
        config, PARENT, batch_size=50, initial_backoff=0.01, batch_id_prefix="sync"
    ) as helper:
        helper.add_many(rows(0, 420))
        helper.add(rows(420, 1)[0])
        assert helper.flush().accepted == 421
    assert helper.totals.reconnects == 1
    assert sorted(fake.stored) == sorted(f"sync-{n}" for n in range(9))


async def test_options_are_checked(client: AsyncFerruleClient) -> None:
    with pytest.raises(ValueError, match="must"):
        AsyncPredictionStreamer(client, PARENT, batch_size=0)
    with pytest.raises(ValueError, match="must"):
        AsyncPredictionStreamer(client, PARENT, batch_size=1001)
    with pytest.raises(ValueError, match="must"):
        AsyncPredictionStreamer(client, PARENT, max_in_flight=0)
