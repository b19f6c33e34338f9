"""Retention: old request-log rows, idempotency keys, stream batch ids and dead sessions.

A background task in every server process deletes, in bounded chunks and short
transactions, what has outlived its purpose. Several processes running it at once is
harmless (each chunk deletes what is still there), so no leader election is needed.
Prediction retention stays an explicit admin RPC (PurgePredictions): deleting business
data is a decision, not housekeeping.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from db.background_tasks import cancel_and_wait
from db.engine import Database
from db.models.base import utcnow
from db.observability import statement_context
from db.repositories.idempotency import IdempotencyRepository, IngestBatchRepository
from db.repositories.request_log import RequestLogRepository
from db.repositories.sessions import SessionsRepository
from db.tenancy import Tenant

log = logging.getLogger("ferrule.retention")

#: Rows deleted per statement (and per transaction): short locks, steady progress.
CHUNK = 1000
#: Chunks per table per run, so one run never monopolises the database.
MAX_CHUNKS = 100


@dataclass(frozen=True)
class RetentionPolicy:
    request_log: timedelta
    idempotency_keys: timedelta
    ingest_batches: timedelta
    inactive_sessions: timedelta


Purge = Callable[[AsyncSession, Tenant, datetime], Awaitable[int]]


def _purges(policy: RetentionPolicy) -> dict[str, tuple[timedelta, Purge]]:
    return {
        "request_log": (
            policy.request_log,
            lambda s, t, c: RequestLogRepository(s, t).purge_older_than(c, limit=CHUNK),
        ),
        "idempotency_keys": (
            policy.idempotency_keys,
            lambda s, t, c: IdempotencyRepository(s, t).purge_older_than(c, limit=CHUNK),
        ),
        "ingest_batches": (
            policy.ingest_batches,
            lambda s, t, c: IngestBatchRepository(s, t).purge_older_than(c, limit=CHUNK),
        ),
        "user_sessions": (
            policy.inactive_sessions,
            lambda s, t, c: SessionsRepository(s, t).purge_inactive(before=c, limit=CHUNK),
        ),
    }


class RetentionJob:
    def __init__(self, database: Database, policy: RetentionPolicy, interval: float) -> None:
        self._database = database
        self._policy = policy
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Delete everything past its retention; returns rows deleted per table."""
        now = now or utcnow()
        deleted: dict[str, int] = {}
        tenant = Tenant.all()
        with statement_context(rpc_method="ferrule.retention"):
            for table, (keep, purge) in _purges(self._policy).items():
                total = 0
                for _ in range(MAX_CHUNKS):
                    async with self._database.transaction(tenant) as session:
                        count = await purge(session, tenant, now - keep)
                    total += count
                    if count < CHUNK:
                        break
                deleted[table] = total
        if any(deleted.values()):
            log.info("retention deleted %s", deleted)
        return deleted

    async def _run(self) -> None:
        while True:
            # Jitter keeps the workers of one machine from purging in lockstep.
            await asyncio.sleep(self._interval * random.uniform(0.5, 1.5))
            try:
                await self.run_once()
            except Exception:  # housekeeping must never take the server down
                log.warning("retention run failed", exc_info=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
