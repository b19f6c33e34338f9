"""WatchPredictions: a resumable tail of new predictions, in commit order.

A notification (db/change_feed.py, kind ``predictions``) only wakes the watcher; the rows
are read from the database after the watcher's position, through the tenant-scoped
repository, so a lost or duplicated notification loses or repeats nothing. The position
is ``(commit_seq, id)`` in an order no row can commit behind (migration 0005 and
:meth:`PredictionsRepository.tail`); the cursor handed to the caller is that position,
signed and bound to the organization, the RPC and the filter like a page token.

Two coroutines per stream: a *reader* task fills a queue of at most
``FERRULE_WATCH_BACKLOG_ROWS`` rows, the response generator sends them. A caller that
reads slower than rows commit stops the generator (HTTP/2 flow control), the queue fills,
and once more rows are waiting the reader stops reading: the generator sends what is
queued, then ends the stream with RESOURCE_EXHAUSTED carrying the cursor after the last
row sent. Memory per stream is the backlog bound, whatever the rate of commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from db import change_feed as feed
from db.background_tasks import cancel_and_wait
from db.errors import FieldViolation, ValidationError
from db.repositories.predictions import (
    PredictionFilter,
    PredictionsRepository,
    TailPage,
    TailPosition,
)
from db.tenancy import Tenant
from ferrule.v1 import prediction_service_pb2 as pb
from server.call_context import current_call
from server.dependencies import Dependencies
from server.errors import ResourceExhaustedError
from server.page_tokens import PageTokenCodec
from server.services import cached_reads as cr
from server.services.prediction_rows import prediction_to_proto

#: Rows per read (and at most per response).
CHUNK_ROWS = 100
#: While committed rows wait for an older transaction (PostgreSQL), which may notify no
#: watcher when it ends: re-read after this, doubling up to the maximum.
HELD_BACK_POLL_S = 0.05
HELD_BACK_POLL_MAX_S = 1.0
BACKLOG_REASON = "WATCH_BACKLOG_EXCEEDED"
CURSOR_FIELD = "cursor"
_SNAPSHOT = re.compile(r"\d{1,20}:\d{1,20}:(\d{1,20}(,\d{1,20})*)?")


@dataclass(frozen=True, slots=True)
class _Overflow:
    """The backlog is full and more rows wait: end the stream after what is queued."""

    position: TailPosition


_Item = tuple[list[pb.Prediction], TailPosition] | _Overflow | BaseException


class _Cursors:
    """Cursor tokens of one watch: the page-token signature over the organization, the
    RPC and the filter."""

    def __init__(self, deps: Dependencies, organization_id: uuid.UUID, query: str) -> None:
        self._codec = deps.page_tokens
        self._organization = str(organization_id)
        self._method = current_call().method
        self._query = PageTokenCodec.fingerprint(query)

    def encode(self, position: TailPosition) -> str:
        ident = "" if position.id is None else str(position.id)
        return self._codec.encode(
            [position.commit_seq, ident, position.snapshot or ""],
            organization=self._organization,
            method=self._method,
            query=self._query,
        )

    def decode(self, token: str) -> TailPosition:
        cursor = self._codec.decode(
            token,
            organization=self._organization,
            method=self._method,
            query=self._query,
            field=CURSOR_FIELD,
        )
        try:
            seq, ident, snapshot = cursor
            if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(ident, str):
                raise ValueError
            if not isinstance(snapshot, str) or (snapshot and not _SNAPSHOT.fullmatch(snapshot)):
                raise ValueError
            return TailPosition(seq, uuid.UUID(ident) if ident else None, snapshot or None)
        except (ValueError, TypeError):
            raise ValidationError([FieldViolation(CURSOR_FIELD, "is malformed")]) from None


class _Tail:
    def __init__(
        self,
        deps: Dependencies,
        tenant: Tenant,
        flt: PredictionFilter,
        subscription: feed.Subscription,
    ) -> None:
        self.deps = deps
        self.tenant = tenant
        self.flt = flt
        self.subscription = subscription
        self.backlog = deps.settings.ferrule_watch_backlog_rows
        self.queued = 0
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()

    async def start(self) -> TailPosition:
        async with cr.primary_read(self.deps, self.tenant) as session:
            return await PredictionsRepository(session, self.tenant).tail_start()

    async def _read(self, position: TailPosition, limit: int) -> TailPage:
        async with cr.primary_read(self.deps, self.tenant) as session:
            return await PredictionsRepository(session, self.tenant).tail(
                self.flt, position, limit=limit
            )

    async def _wait(self, held_back: bool, poll: float) -> None:
        if not held_back:
            await self.subscription.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(poll):
                await self.subscription.wait()

    async def read(self, position: TailPosition) -> None:
        """The reader task: queue what commits after ``position`` until the backlog is
        full and more waits."""
        try:
            poll = HELD_BACK_POLL_S
            while True:
                room = self.backlog - self.queued
                page = await self._read(position, max(1, min(CHUNK_ROWS, room)))
                if page.rows and room <= 0:
                    self.queue.put_nowait(_Overflow(position))
                    return
                if page.rows:
                    self.queued += len(page.rows)
                    protos = [prediction_to_proto(r) for r in page.rows]
                    self.queue.put_nowait((protos, page.position))
                position = page.position
                if page.more:
                    continue
                await self._wait(page.held_back, poll)
                poll = min(poll * 2, HELD_BACK_POLL_MAX_S) if page.held_back else HELD_BACK_POLL_S
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream ends with it, after what is queued
            self.queue.put_nowait(exc)

    def sent(self, rows: int) -> None:
        self.queued -= rows


async def watch_predictions(
    deps: Dependencies,
    tenant: Tenant,
    flt: PredictionFilter,
    query: str,
    cursor: str,
) -> AsyncIterator[pb.WatchPredictionsResponse]:
    """The WatchPredictions handler body, after authorization and filter validation;
    ``query`` identifies the filter for the cursor's signature."""
    organization_id = tenant.require_organization()
    cursors = _Cursors(deps, organization_id, query)
    position = cursors.decode(cursor) if cursor else None
    with (
        deps.watch_slots.slot(),
        deps.changes.subscribe(organization_id, (feed.PREDICTIONS,)) as sub,
    ):
        # Subscribed before the first read: a commit in between wakes `sub`.
        tail = _Tail(deps, tenant, flt, sub)
        if position is None:
            position = await tail.start()
        yield pb.WatchPredictionsResponse(cursor=cursors.encode(position))
        reader = asyncio.create_task(tail.read(position), name="ferrule-watch-predictions")
        try:
            while True:
                item = await tail.queue.get()
                if isinstance(item, _Overflow):
                    token = cursors.encode(item.position)
                    raise ResourceExhaustedError(
                        "the caller read slower than predictions arrived and the backlog "
                        "reached its bound; resume from the cursor in the error's metadata",
                        retry_after_seconds=0.0,
                        reason=BACKLOG_REASON,
                        metadata={CURSOR_FIELD: token},
                    )
                if isinstance(item, BaseException):
                    raise item
                predictions, after = item
                tail.sent(len(predictions))
                yield pb.WatchPredictionsResponse(
                    predictions=predictions, cursor=cursors.encode(after)
                )
        finally:
            await cancel_and_wait([reader], within=deps.database.cleanup_timeout)
