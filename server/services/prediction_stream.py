"""StreamPredictions: the bidirectional ingest stream (see prediction_service.proto).

Three coroutines per stream, joined by queues:

* the *reader* (a task) pulls a message only while fewer than ``MAX_UNACKED_BATCHES``
  batches are unacknowledged and the ingest budget has room, so a slow database stops
  the reads and HTTP/2 flow control pushes back on the sender; it checks the protocol,
  authorizes the first ``parent`` and validates the rows (CPU work that overlaps the
  committer's database round trips);
* the *committer* (a task) takes every batch queued so far, writes them in one
  transaction (group commit), returns what they held of the budget and queues their
  acknowledgements, in order;
* the *responder* (the response generator) sends the acknowledgements; only then do
  their batches leave the stream's window.

The budget is fair by stream. Rows and bytes read but not yet committed are held from a
process-wide :class:`IngestBudget`, first come first served, and each stream holds at most
a ``STREAM_SHARE`` part of it. A batch's share comes back when it commits, not when its
acknowledgement is sent: a client that stops reading acknowledgements fills only its own
window, so only its own reads stop (HTTP/2 flow control on that stream), and it holds
none of the budget that other streams, of any tenant, need.

A protocol error ends the stream after the batches read before it are acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from db import change_feed as feed
from db.background_tasks import cancel_and_wait
from db.errors import FieldViolation, ValidationError
from db.repositories.prediction_ingest import PendingBatch, StagedRow, ingest_batches
from db.tenancy import Tenant
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1.common_pb2 import FieldViolation as FieldViolationProto
from server import names
from server.scoping import authorize, caller_subject
from server.services import cached_reads as cr
from server.services.prediction_rows import INVALID_FORMAT, validate_staged_row
from server.telemetry import record_rows_ingested

if TYPE_CHECKING:
    import grpc

    from server.dependencies import Dependencies

#: The contract's read-ahead window per stream.
MAX_UNACKED_BATCHES = 8
#: Batches per transaction at most: half the window, so that while one group commits
#: the reader can take in and validate the next (double buffering) instead of idling.
MAX_GROUP_BATCHES = MAX_UNACKED_BATCHES // 2
#: Groups being written at once per stream (pipelining: see stream_predictions).
MAX_CONCURRENT_COMMITS = 2
#: The contract's bound on one message.
MAX_BATCH_ROWS = 1000
#: Rows and serialized bytes held in memory (read, not yet committed) by all streams of
#: the process: at roughly 1-2 KiB per row in flight, ingest buffers stay near 100 MiB.
MAX_BUFFERED_ROWS = 64_000
MAX_BUFFERED_BYTES = 64 * 1024 * 1024
#: One stream holds at most 1/STREAM_SHARE of each: several streams sending the largest
#: messages still leave room for the rest.
STREAM_SHARE = 4
_BATCH_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")

#: Rows and bytes taken from a budget.
Amount = tuple[int, int]


class IngestBudget:
    """A counting semaphore over rows and bytes together, first come first served (a big
    batch is not starved by small ones). A request larger than the whole budget takes
    all of it, so one oversized message waits for an empty budget rather than forever."""

    def __init__(self, rows: int, nbytes: int) -> None:
        self.limit: Amount = (rows, nbytes)
        self.available_rows = rows
        self.available_bytes = nbytes
        self._waiters: deque[tuple[Amount, asyncio.Future[None]]] = deque()

    def _fits(self, amount: Amount) -> bool:
        return amount[0] <= self.available_rows and amount[1] <= self.available_bytes

    async def acquire(self, rows: int, nbytes: int) -> Amount:
        """Wait for ``rows`` and ``nbytes`` (each at most the limit); returns what was
        taken, which is what :meth:`release` must be given back."""
        amount = (min(rows, self.limit[0]), min(nbytes, self.limit[1]))
        if not self._waiters and self._fits(amount):
            self._take(amount)
            return amount
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(*amount)  # granted just as we were cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return amount

    def release(self, rows: int, nbytes: int) -> None:
        self.available_rows += rows
        self.available_bytes += nbytes
        self._wake()

    def _take(self, amount: Amount) -> None:
        self.available_rows -= amount[0]
        self.available_bytes -= amount[1]

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            amount, future = self._waiters.popleft()
            if future.done():
                continue
            self._take(amount)
            future.set_result(None)


_budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IngestBudget] = (
    weakref.WeakKeyDictionary()
)


def ingest_budget() -> IngestBudget:
    """The process-wide budget (one per event loop: asyncio objects are loop-bound)."""
    loop = asyncio.get_running_loop()
    budget = _budgets.get(loop)
    if budget is None:
        budget = _budgets[loop] = IngestBudget(MAX_BUFFERED_ROWS, MAX_BUFFERED_BYTES)
    return budget


def stream_share() -> IngestBudget:
    """One stream's part of the process-wide budget."""
    return IngestBudget(MAX_BUFFERED_ROWS // STREAM_SHARE, MAX_BUFFERED_BYTES // STREAM_SHARE)


@dataclass(slots=True, eq=False)  # identity: `holding` removes this batch, not an equal one
class _Batch:
    """One received batch: what to write, what to answer, what it holds of the budget."""

    batch_id: str
    size: int
    pending: PendingBatch
    #: Valid rows with their ids, in index order (the writer drops in-group repeats).
    rows: list[StagedRow]
    rejected: list[pb.RejectedPrediction]
    #: What the batch holds of the process budget and of its stream's share (same
    #: amounts, unless one was clamped to its limit), until it commits.
    held: Amount
    held_share: Amount


@dataclass(slots=True)
class _End:
    """End of the input: half-close (error None) or a protocol/authorization error."""

    error: BaseException | None = None


@dataclass
class _Stream:
    deps: Dependencies
    budget: IngestBudget
    share: IngestBudget = field(default_factory=stream_share)
    window: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_UNACKED_BATCHES)
    )
    queue: asyncio.Queue[_Batch | _End] = field(default_factory=asyncio.Queue)
    #: Committed groups with their acknowledgements, in order; then the end. Bounded by
    #: the window: a batch leaves the window only once its acknowledgement is sent.
    outbox: asyncio.Queue[tuple[list[_Batch], list[pb.StreamPredictionsResponse]] | _End] = field(
        default_factory=asyncio.Queue
    )
    parent: str = ""
    organization_id: uuid.UUID | None = None
    create_by: str | None = None
    #: Batches holding budget (read, not yet committed): returned if the stream dies.
    holding: list[_Batch] = field(default_factory=list)

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
        nbytes = request.ByteSize()
        # The stream's own share first: a stream at its share waits without queueing in
        # front of other streams for the process budget.
        held_share = await self.share.acquire(size, nbytes)
        try:
            held = await self.budget.acquire(size, nbytes)
        except BaseException:
            self.share.release(*held_share)
            raise
        pending = PendingBatch(batch_id=batch_id, valid=0, rejected=0)
        batch = _Batch(batch_id, size, pending, [], [], held, held_share)
        self.holding.append(batch)
        batch.rows, batch.rejected = self._validate(batch_id, request.predictions)
        pending.valid, pending.rejected = len(batch.rows), len(batch.rejected)
        return batch

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
            async with cr.write_transaction(self.deps, Tenant.of(self.organization_id)) as (
                session,
                stale,
            ):
                stale.bump(cr.prediction_stats_generation(self.organization_id))
                stale.changed(feed.PREDICTIONS, self.organization_id, None)
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

    def committed(self, group: list[_Batch]) -> None:
        """The group's rows are written: what they held of the budget goes back now,
        whether or not the client ever reads their acknowledgements."""
        for batch in group:
            self._release(batch)

    def _release(self, batch: _Batch) -> None:
        self.holding.remove(batch)
        self.budget.release(*batch.held)
        self.share.release(*batch.held_share)

    def release_all(self) -> None:
        for batch in list(self.holding):
            self._release(batch)

    def acknowledged(self, group: list[_Batch]) -> None:
        for _ in group:
            self.window.release()

    async def commit_all(self) -> None:
        """The committer: group commits, up to ``MAX_CONCURRENT_COMMITS`` at once, each in
        its own transaction, so the database works on one group while this process encodes
        the next; acknowledgements are queued in batch order, each after its own commit.
        Concurrent groups need no coordination: row ids and batch ids are unique keys, so
        a later group that repeats an id waits for the earlier transaction and then skips
        the row (or writes it, if the earlier one rolled back)."""
        getter: asyncio.Task[tuple[list[_Batch], _End | None]] | None = None
        committing: deque[tuple[list[_Batch], asyncio.Task[list[pb.StreamPredictionsResponse]]]] = (
            deque()
        )
        end: _End | None = None
        try:
            while True:
                if end is None and getter is None and len(committing) < MAX_CONCURRENT_COMMITS:
                    getter = asyncio.create_task(self.next_group())
                waiting: set[asyncio.Future[Any]] = {committing[0][1]} if committing else set()
                if getter is not None:
                    waiting.add(getter)
                if not waiting:
                    break  # input ended and everything is committed
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter is not None and getter.done():
                    group, end = getter.result()
                    getter = None
                    if group:
                        committing.append((group, asyncio.create_task(self.commit(group))))
                while committing and committing[0][1].done():
                    group, task = committing.popleft()
                    try:
                        responses = task.result()
                    except Exception as exc:  # that transaction failed: the stream ends
                        self.outbox.put_nowait(_End(exc))
                        return
                    self.committed(group)
                    self.outbox.put_nowait((group, responses))
            self.outbox.put_nowait(end if end is not None else _End())
        finally:
            leftovers: list[asyncio.Task[Any]] = [task for _, task in committing]
            if getter is not None:
                leftovers.append(getter)
            # Abandoning a commit at shutdown loses no acknowledged row: acknowledgements
            # are queued only after their commit returned, and the client re-sends the
            # rest (batch ids make the re-send idempotent).
            await cancel_and_wait(leftovers, within=self.deps.database.cleanup_timeout)


class _DerivedIds:
    """uuid5(NAMESPACE_URL, prefix + str(index)) for one batch, hashing the shared prefix
    once instead of per row as uuid.uuid5 would (equal results, checked by the tests)."""

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
    """The StreamPredictions handler body (PredictionService delegates here): sends the
    acknowledgements the committer queues (see the module docstring)."""
    stream = _Stream(deps, ingest_budget())
    tasks = [
        asyncio.create_task(stream.read(request_iterator)),
        asyncio.create_task(stream.commit_all()),
    ]
    try:
        while True:
            item = await stream.outbox.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            group, responses = item
            for response in responses:
                yield response
            stream.acknowledged(group)
    finally:
        await cancel_and_wait(tasks, within=deps.database.cleanup_timeout)
        stream.release_all()
