"""StreamPredictions: the bidirectional ingest stream (see prediction_service.proto).

Two coroutines per stream, joined by a queue:

* the *reader* (a task) pulls a message only while fewer than ``MAX_UNACKED_BATCHES``
  batches are unacknowledged and the process-wide row budget has room, so a slow
  database stops the reads and HTTP/2 flow control pushes back on the sender; it checks
  the protocol, authorizes the first ``parent`` and validates the rows (CPU work that
  overlaps the writer's database round trips);
* the *writer* (the response generator) takes every batch queued so far, writes them in
  one transaction (group commit), and only then yields their acknowledgements, in order.

A protocol error ends the stream after the batches read before it are acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from db.errors import FieldViolation, ValidationError
from db.repositories.prediction_ingest import PendingBatch, StagedRow, ingest_batches
from db.tenancy import Tenant
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1.common_pb2 import FieldViolation as FieldViolationProto
from server import names
from server.scoping import authorize, caller_subject, transaction
from server.services import cached_reads as cr
from server.services.prediction_rows import INVALID_FORMAT, validate_staged_row
from server.telemetry import record_rows_ingested

if TYPE_CHECKING:
    import grpc

    from server.app import Dependencies

#: The contract's read-ahead window per stream.
MAX_UNACKED_BATCHES = 8
#: Batches per transaction at most: half the window, so that while one group commits
#: the reader can take in and validate the next (double buffering) instead of idling.
MAX_GROUP_BATCHES = MAX_UNACKED_BATCHES // 2
#: Groups being written at once per stream (pipelining: see stream_predictions).
MAX_CONCURRENT_COMMITS = 2
#: The contract's bound on one message.
MAX_BATCH_ROWS = 1000
#: Rows held in memory (read, not yet acknowledged) by all streams of the process. At
#: roughly 1-2 KiB per row in flight this caps ingest buffers near 100 MiB.
MAX_BUFFERED_ROWS = 64_000
_BATCH_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")


class RowBudget:
    """A counting semaphore over rows, first come first served (a big batch is not
    starved by small ones)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.available = limit
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, rows: int) -> None:
        rows = min(rows, self.limit)
        if not self._waiters and self.available >= rows:
            self.available -= rows
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (rows, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(rows)  # granted just as we were cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, rows: int) -> None:
        self.available += min(rows, self.limit)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.available:
            rows, future = self._waiters.popleft()
            if future.done():
                continue
            self.available -= rows
            future.set_result(None)


_budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RowBudget] = (
    weakref.WeakKeyDictionary()
)


def row_budget() -> RowBudget:
    """The process-wide budget (one per event loop: asyncio objects are loop-bound)."""
    loop = asyncio.get_running_loop()
    budget = _budgets.get(loop)
    if budget is None:
        budget = _budgets[loop] = RowBudget(MAX_BUFFERED_ROWS)
    return budget


@dataclass(slots=True)
class _Batch:
    """One received batch: what to write, what to answer, what it holds of the budget."""

    batch_id: str
    size: int
    pending: PendingBatch
    #: Valid rows with their ids, in index order (the writer drops in-group repeats).
    rows: list[StagedRow]
    rejected: list[pb.RejectedPrediction]
    held_rows: int


@dataclass(slots=True)
class _End:
    """End of the input: half-close (error None) or a protocol/authorization error."""

    error: BaseException | None = None


@dataclass
class _Stream:
    deps: Dependencies
    budget: RowBudget
    window: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_UNACKED_BATCHES)
    )
    queue: asyncio.Queue[_Batch | _End] = field(default_factory=asyncio.Queue)
    parent: str = ""
    organization_id: uuid.UUID | None = None
    create_by: str | None = None
    #: Rows the reader holds from the budget (returned if the stream dies).
    held_rows: int = 0

    # --- reader ---------------------------------------------------------------------
    async def read(self, requests: AsyncIterator[pb.StreamPredictionsRequest]) -> None:
        try:
            while True:
                await self.window.acquire()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    self.window.release()
                    break
                batch = await self._receive(request)
                self.queue.put_nowait(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ends the stream after what was read is acknowledged
            self.queue.put_nowait(_End(exc))
            return
        self.queue.put_nowait(_End())

    async def _receive(self, request: pb.StreamPredictionsRequest) -> _Batch:
        self._check_parent(request.parent)
        batch_id = request.batch_id
        if _BATCH_ID.fullmatch(batch_id) is None:
            raise ValidationError(
                [FieldViolation("batch_id", "required: 1 to 128 characters of [A-Za-z0-9._~-]")]
            )
        size = len(request.predictions)
        if size > MAX_BATCH_ROWS:
            raise ValidationError(
                [FieldViolation("predictions", f"at most {MAX_BATCH_ROWS} per batch, got {size}")]
            )
        await self.budget.acquire(size)
        self.held_rows += size
        rows, rejected = self._validate(batch_id, request.predictions)
        pending = PendingBatch(batch_id=batch_id, valid=len(rows), rejected=len(rejected))
        return _Batch(batch_id, size, pending, rows, rejected, size)

    def _check_parent(self, parent: str) -> None:
        if self.organization_id is None:
            (organization_id,) = authorize(names.ORGANIZATION, parent, "parent")
            self.organization_id = organization_id
            self.parent = names.ORGANIZATION.format(organization_id)
            self.create_by = caller_subject()
        elif (
            parent
            and parent != self.parent
            and names.ORGANIZATION.parse(parent, "parent")[0] != self.organization_id
        ):
            raise ValidationError([FieldViolation("parent", "must not change within a stream")])

    def _validate(
        self, batch_id: str, predictions: Any
    ) -> tuple[list[StagedRow], list[pb.RejectedPrediction]]:
        organization_id = self.organization_id
        assert organization_id is not None
        derived_id = _DerivedIds(f"{self.parent}/streamBatches/{batch_id}/")
        name_prefix = f"{self.parent}/predictions/"
        now = datetime.now(UTC)
        rows: list[StagedRow] = []
        rejected: list[pb.RejectedPrediction] = []
        for index, message in enumerate(predictions):
            name = message.name
            if name:
                prediction_id = _client_id(name, name_prefix)
                if prediction_id is None:
                    violation = FieldViolationProto(
                        field="name",
                        description=f"expected {name_prefix}{{uuid}}",
                        reason=INVALID_FORMAT,
                    )
                    rejected.append(pb.RejectedPrediction(index=index, violations=[violation]))
                    continue
            else:
                prediction_id = derived_id(index)
            row = validate_staged_row(message, prediction_id, batch_id, now)
            if isinstance(row, tuple):
                rows.append(row)
            else:
                rejected.append(
                    pb.RejectedPrediction(index=index, violations=[v.to_proto() for v in row])
                )
        return rows, rejected

    # --- writer ---------------------------------------------------------------------
    async def next_group(self) -> tuple[list[_Batch], _End | None]:
        """Every batch queued now (at least one, unless the input ended)."""
        group: list[_Batch] = []
        item = await self.queue.get()
        while True:
            if isinstance(item, _End):
                return group, item
            group.append(item)
            if self.queue.empty() or len(group) >= MAX_GROUP_BATCHES:
                return group, None
            item = self.queue.get_nowait()

    async def commit(self, group: list[_Batch]) -> list[pb.StreamPredictionsResponse]:
        """Write the group in one transaction; the acknowledgements, once committed."""
        pendings = _dedupe(group)
        if pendings:
            assert self.organization_id is not None
            # One bump per committed group (not per row), before its acknowledgements.
            async with cr.invalidation(self.deps) as stale:
                stale.bump(cr.prediction_stats_generation(self.organization_id))
                async with transaction(self.deps, Tenant.of(self.organization_id)) as session:
                    counts = await ingest_batches(
                        session, self.organization_id, self.create_by, pendings
                    )
            by_batch = {p.batch_id: c.accepted for p, c in zip(pendings, counts, strict=True)}
        else:
            by_batch = {}
        responses: list[pb.StreamPredictionsResponse] = []
        accepted_total = 0
        for batch in group:
            accepted = by_batch.pop(batch.batch_id, 0)  # a repeated batch id gets none
            accepted_total += accepted
            responses.append(
                pb.StreamPredictionsResponse(
                    batch_id=batch.batch_id,
                    accepted=accepted,
                    duplicates=len(batch.rows) - accepted,
                    rejected=batch.rejected,
                )
            )
        if accepted_total:
            record_rows_ingested(accepted_total, kind="prediction")
        return responses

    def acknowledged(self, group: list[_Batch]) -> None:
        rows = sum(b.held_rows for b in group)
        self.held_rows -= rows
        self.budget.release(rows)
        for _ in group:
            self.window.release()


class _DerivedIds:
    """uuid5(NAMESPACE_URL, prefix + str(index)) for one batch, hashing the shared prefix
    once (half the cost of uuid.uuid5 per row; equal results, checked by the tests)."""

    def __init__(self, prefix: str) -> None:
        self._base = hashlib.sha1(uuid.NAMESPACE_URL.bytes + prefix.encode(), usedforsecurity=False)

    def __call__(self, index: int) -> uuid.UUID:
        digest = self._base.copy()
        digest.update(str(index).encode())
        value = int.from_bytes(digest.digest()[:16])
        value = (value & _CLEAR_VERSION_AND_VARIANT) | _VERSION_5_AND_RFC_VARIANT
        return uuid.UUID(int=value)


_CLEAR_VERSION_AND_VARIANT = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_VERSION_5_AND_RFC_VARIANT = (0x5000 << 64) | (0x8000 << 48)


def _client_id(name: str, prefix: str) -> uuid.UUID | None:
    if not name.startswith(prefix):
        return None
    try:
        return uuid.UUID(name[len(prefix) :])
    except ValueError:
        return None


def _dedupe(group: list[_Batch]) -> list[PendingBatch]:
    """The group's distinct batches, each row id once (the first occurrence wins).

    A batch id seen earlier in the group is a re-send: it writes nothing. A row id seen
    earlier in the group is dropped here and counts as a duplicate.
    """
    seen_batches: set[str] = set()
    seen_ids: set[uuid.UUID] = set()
    pendings: list[PendingBatch] = []
    for batch in group:
        if batch.batch_id in seen_batches:
            continue
        seen_batches.add(batch.batch_id)
        pending = batch.pending
        pending.rows = []
        for row in batch.rows:
            if row[0] not in seen_ids:
                seen_ids.add(row[0])
                pending.rows.append(row)
        pendings.append(pending)
    return pendings


async def stream_predictions(
    deps: Dependencies,
    request_iterator: AsyncIterator[pb.StreamPredictionsRequest],
    context: grpc.aio.ServicerContext[Any, Any],
) -> AsyncIterator[pb.StreamPredictionsResponse]:
    """The StreamPredictions handler body (PredictionService delegates here).

    Up to ``MAX_CONCURRENT_COMMITS`` groups are written at once, each in its own
    transaction, so the database works on one group while this process encodes the
    next; acknowledgements still leave in batch order, each after its own commit.
    Concurrent groups need no coordination: row ids and batch ids are unique keys, so a
    later group that repeats an id waits for the earlier transaction and then skips the
    row (or writes it, if the earlier one rolled back).
    """
    stream = _Stream(deps, row_budget())
    reader = asyncio.create_task(stream.read(request_iterator))
    getter: asyncio.Task[tuple[list[_Batch], _End | None]] | None = None
    committing: deque[tuple[list[_Batch], asyncio.Task[list[pb.StreamPredictionsResponse]]]] = (
        deque()
    )
    end: _End | None = None
    try:
        while True:
            if end is None and getter is None and len(committing) < MAX_CONCURRENT_COMMITS:
                getter = asyncio.create_task(stream.next_group())
            waiting: set[asyncio.Future[Any]] = {committing[0][1]} if committing else set()
            if getter is not None:
                waiting.add(getter)
            if not waiting:
                break  # input ended and everything is acknowledged
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter is not None and getter.done():
                group, end = getter.result()
                getter = None
                if group:
                    committing.append((group, asyncio.create_task(stream.commit(group))))
            while committing and committing[0][1].done():
                group, task = committing.popleft()
                for response in task.result():  # raises if that transaction failed
                    yield response
                stream.acknowledged(group)
        if end is not None and end.error is not None:
            raise end.error
    finally:
        pending: list[asyncio.Task[Any]] = [reader, *(task for _, task in committing)]
        if getter is not None:
            pending.append(getter)
        for leftover in pending:
            leftover.cancel()
        for leftover in pending:
            with contextlib.suppress(BaseException):
                await leftover
        if stream.held_rows:
            stream.budget.release(stream.held_rows)
            stream.held_rows = 0
