"""Which database a read-only transaction runs on, keeping read-your-writes per caller.

With ``DATABASE_REPLICA_URLS`` set, read-only transactions (Get, List, statistics) go to
the streaming replicas in turn and every read-write transaction goes to the primary.
A replica can lag, so a caller that just wrote could read its own write back as
NOT_FOUND. Ferrule prevents that with **WAL positions (LSNs), not time windows**: a
window is a guess about lag, an LSN is a proof.

* A caller is the token's identity: (JWT ``sub``, JWT ``org``). After any read-write
  transaction of a caller ends (committed or not: a failed commit may still have
  landed), the caller is marked *pending*. This costs nothing on the write path.
* The caller's next read resolves the mark: it asks the primary for
  ``pg_current_wal_insert_lsn()``. The write committed before its RPC answered, so that
  position is at or past the write's commit record. It becomes the caller's
  *required LSN* (monotonic).
* A read with a required LSN uses a replica only if the replica's replayed position
  (``pg_last_wal_replay_lsn()``) has reached it. Replayed positions only grow, so the
  router remembers the highest one seen per replica and asks the replica again (one
  short query, shared by concurrent readers) only when the remembered value is too
  low. If the replica is behind, slow or down, the read goes to the primary.
* Callers that have not written (or whose writes every replica has replayed) read from
  the replicas with no extra query at all.

The bookkeeping is per server process and bounded (``max_callers``); evicting a caller
raises a process-wide floor that every read must meet, so eviction costs primary reads,
never stale ones.

Across processes and machines (several SO_REUSEPORT workers, several replicas behind a
load balancer) each write also bumps a per-caller counter in the shared cache (Redis).
Before a read, the router peeks at that counter (never creating it): absent means the
caller never wrote; a value other than the last one this process saw means the caller
wrote through another process (or this is the first sight of a caller that wrote), so
the read resolves a fresh primary position exactly as for a local write. That costs one
Redis round trip per read and per write, and only when replicas are configured. When
the counter cannot be read (Redis down), the read goes to the primary: never stale.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from db.background_tasks import cancel_and_wait
from db.cache import UNKNOWN_GENERATION, Cache
from db.engine import Database
from db.replication import primary_position, replayed_position
from server.call_context import maybe_current_call

#: (JWT subject, JWT organization claim): whose writes must stay visible to whom.
CallerKey = tuple[str, str]


def _writer_counter(caller: CallerKey) -> str:
    """The shared counter's name: a digest, since subjects may hold any character."""
    digest = hashlib.sha256("\x00".join(caller).encode()).hexdigest()[:32]
    return f"writer.{digest}"


def caller_key() -> CallerKey | None:
    """The current RPC's caller, or None outside an authenticated RPC."""
    call = maybe_current_call()
    if call is None or call.principal is None:
        return None
    return (call.principal.subject, call.principal.organization)


@dataclass
class RoutingStats:
    """Counters for operations and tests: where the reads went and why."""

    replica_reads: int = 0
    primary_reads: int = 0
    #: Reads that wanted a replica but went to the primary because it had not caught up.
    lagging_fallbacks: int = 0
    primary_lsn_queries: int = 0
    replica_lsn_queries: int = 0


@dataclass
class _Mark:
    lsn: int = 0
    #: Written since `lsn` was taken: the next read must ask the primary again.
    pending: bool = False


class WriteTracker:
    """The last write position of each recent caller, bounded in memory."""

    def __init__(self, max_callers: int) -> None:
        self.max_callers = max_callers
        self._marks: OrderedDict[CallerKey, _Mark] = OrderedDict()
        #: What every read must meet: the highest position of evicted callers.
        self.floor = _Mark()

    def wrote(self, caller: CallerKey) -> None:
        mark = self._marks.get(caller)
        if mark is None:
            mark = self._marks[caller] = _Mark()
        self._marks.move_to_end(caller)
        mark.pending = True
        while len(self._marks) > self.max_callers:
            _, evicted = self._marks.popitem(last=False)
            self.floor.lsn = max(self.floor.lsn, evicted.lsn)
            self.floor.pending = self.floor.pending or evicted.pending

    def marks_for(self, caller: CallerKey | None) -> list[_Mark]:
        """The marks a read by ``caller`` must honour (the floor, and the caller's own)."""
        marks = [self.floor]
        if caller is not None and (mark := self._marks.get(caller)) is not None:
            marks.append(mark)
        return marks

    def forget_if_replayed(self, caller: CallerKey | None, replayed_everywhere: int) -> None:
        """Drop a caller's mark once every replica has replayed it: reads are free again."""
        if caller is None:
            return
        mark = self._marks.get(caller)
        if mark is not None and not mark.pending and mark.lsn <= replayed_everywhere:
            del self._marks[caller]

    def __len__(self) -> int:
        return len(self._marks)


class ReadRouter:
    def __init__(
        self,
        database: Database,
        *,
        shared: Cache | None = None,
        max_callers: int = 100_000,
        check_timeout: float = 1.0,
    ) -> None:
        self.database = database
        self.shared = shared
        #: The shared writer counter last seen per caller (bounded like the tracker).
        self._seen: OrderedDict[CallerKey, int] = OrderedDict()
        self._max_callers = max_callers
        self.replicas: tuple[AsyncEngine, ...] = database.replica_engines
        self.tracker = WriteTracker(max_callers)
        self.stats = RoutingStats()
        self.check_timeout = check_timeout
        self._replayed = [0] * len(self.replicas)
        self._checks: dict[int, asyncio.Task[int | None]] = {}
        self._next = 0

    @property
    def enabled(self) -> bool:
        return bool(self.replicas)

    async def wrote(self, caller: CallerKey | None) -> None:
        """Called after each read-write transaction of ``caller`` ends (before the RPC
        answers, so every process sees the shared counter move before the caller can)."""
        if not self.enabled or caller is None:
            return
        self.tracker.wrote(caller)
        if self.shared is not None:
            await self.shared.bump(_writer_counter(caller))

    async def _fold_shared_writes(self, caller: CallerKey) -> bool:
        """Mark ``caller`` pending if it wrote through another process; False if unknown."""
        assert self.shared is not None
        generation = await self.shared.peek_generation(_writer_counter(caller))
        if generation == UNKNOWN_GENERATION:
            return False
        if generation is not None and self._seen.get(caller) != generation:
            self.tracker.wrote(caller)  # perhaps our own write: one extra primary query
            self._seen[caller] = generation
            self._seen.move_to_end(caller)
            while len(self._seen) > self._max_callers:
                self._seen.popitem(last=False)  # forgetting only costs a primary query
        return True

    async def engine_for_read(self, caller: CallerKey | None) -> AsyncEngine | None:
        """The engine for a read-only transaction of ``caller``; None without replicas."""
        if not self.enabled:
            return None
        index = self._next
        self._next = (self._next + 1) % len(self.replicas)
        if (
            self.shared is not None
            and caller is not None
            and not await self._fold_shared_writes(caller)
        ):
            return self._primary()
        required = await self._required_lsn(caller)
        if required is None:
            return self._primary()
        if required == 0:
            return self._replica(index)
        order = [(index + i) % len(self.replicas) for i in range(len(self.replicas))]
        for candidate in order:
            if self._replayed[candidate] >= required:
                return self._replica(candidate, caller)
        replayed = await self._check_replica(index)
        if replayed is not None and replayed >= required:
            return self._replica(index, caller)
        self.stats.lagging_fallbacks += 1
        return self._primary()

    def _replica(self, index: int, caller: CallerKey | None = None) -> AsyncEngine:
        self.stats.replica_reads += 1
        self.tracker.forget_if_replayed(caller, min(self._replayed))
        return self.replicas[index]

    def _primary(self) -> AsyncEngine:
        self.stats.primary_reads += 1
        return self.database.engine

    async def _required_lsn(self, caller: CallerKey | None) -> int | None:
        """The position a replica must have replayed; None when it cannot be known."""
        marks = self.tracker.marks_for(caller)
        if any(mark.pending for mark in marks):
            # Clear before asking: a write ending during the query marks again.
            pending = [mark for mark in marks if mark.pending]
            for mark in pending:
                mark.pending = False
            current = await self._primary_lsn()
            if current is None:
                for mark in pending:
                    mark.pending = True
                return None
            for mark in pending:
                mark.lsn = max(mark.lsn, current)
        return max(mark.lsn for mark in marks)

    async def _primary_lsn(self) -> int | None:
        self.stats.primary_lsn_queries += 1
        try:
            return await primary_position(self.database.engine)
        except Exception:
            return None  # the read itself will meet (and report) the primary's failure

    async def _check_replica(self, index: int) -> int | None:
        """The replica's replayed position, one query in flight per replica."""
        task = self._checks.get(index)
        if task is None:
            task = asyncio.ensure_future(self._query_replica(index))
            self._checks[index] = task
            task.add_done_callback(lambda _: self._checks.pop(index, None))
        return await asyncio.shield(task)

    async def _query_replica(self, index: int) -> int | None:
        self.stats.replica_lsn_queries += 1
        try:
            async with asyncio.timeout(self.check_timeout):
                replayed = await replayed_position(self.replicas[index])
        except Exception:
            return None  # slow or down: this read goes to the primary
        if replayed is None:
            return None
        self._replayed[index] = max(self._replayed[index], replayed)
        return self._replayed[index]

    async def aclose(self) -> None:
        await cancel_and_wait(list(self._checks.values()))


_routers: weakref.WeakKeyDictionary[Database, ReadRouter] = weakref.WeakKeyDictionary()


def router_for(database: Database, shared: Cache | None = None) -> ReadRouter:
    """The process's router for ``database`` (created on first use, lives as long)."""
    router = _routers.get(database)
    if router is None:
        router = _routers[database] = ReadRouter(database, shared=shared)
    return router
