"""The read-through cache front that servicers put between themselves and repositories.

Decisions:

* ``None`` (not found) is never cached. A cached absence would have to be invalidated by
  every Create and Undelete under the same name, and the only gain would be for callers
  that repeatedly ask for names that do not exist.
* Failed loads are never cached; the exception reaches every caller waiting on that load.
* No method raises because of the backend: a failure or an open breaker means "call the
  loader" for reads and "remember and replay" for invalidations.
* Invalidations that fail (Redis down) are kept, bounded, and replayed before this
  process reads from the backend again; until then its reads bypass the cache, so a
  caller never reads back an entry its own write could not invalidate here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span

from db.cache.backend import CacheBackend, ttl_to_ms
from db.cache.errors import CacheBackendError, CacheUnavailable
from db.cache.keys import UNKNOWN_GENERATION, CacheKey, generation_key
from db.cache.stats import CacheStats, Counters

log = logging.getLogger(__name__)

Loader = Callable[[], Awaitable[bytes | None]]


@dataclass(eq=False)
class _Flight:
    """One in-process load shared by every concurrent miss on the same key."""

    task: asyncio.Task[bytes | None]
    waiters: int = 0


@dataclass(eq=False)
class _Pending:
    """Invalidations the backend refused, to replay before trusting it again."""

    keys: set[str] = field(default_factory=set)
    counters: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.keys) + len(self.counters)


def _initial_generation() -> int:
    """Where a missing counter starts: microseconds since the epoch. If Redis evicts or
    loses a counter, the recreated one starts above every value the old one can have
    reached (unless it was bumped more than once per microsecond), so old statistics
    never become reachable again."""
    return time.time_ns() // 1000


class Cache:
    """Read-through cache over a :class:`CacheBackend` (Redis or the in-process LRU).

    ``lease_ms`` bounds how long one load may hold a key's lease (a load that outlives
    it just does not store its value); ``lock_wait_ms`` bounds how long a process that
    did not get the lease polls for the holder's value before loading itself, polling
    every ``poll_ms``. A failed invalidation or generation bump is retried (every
    ``poll_ms``) for up to ``invalidation_retry_ms`` before the write answers, unless
    the breaker is open. At most ``max_pending_invalidations`` failed invalidations are
    remembered for replay; beyond that they are counted as lost (TTL bounds staleness).
    """

    def __init__(
        self,
        backend: CacheBackend,
        *,
        prefix: str,
        lease_ms: int = 2_000,
        lock_wait_ms: int = 250,
        poll_ms: int = 10,
        max_pending_invalidations: int = 10_000,
        invalidation_retry_ms: int = 1_000,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        if not prefix or ":" in prefix:
            raise ValueError("cache prefix must be non-empty and contain no ':'")
        self._backend = backend
        self._prefix = prefix
        self._lease_ms = lease_ms
        self._lock_wait = lock_wait_ms / 1000
        self._poll = poll_ms / 1000
        self._max_pending = max_pending_invalidations
        self._invalidation_retry = invalidation_retry_ms / 1000
        self._flights: dict[str, _Flight] = {}
        self._pending = _Pending()
        self._background: set[asyncio.Task[Any]] = set()
        self._counters = Counters()
        self._tracer = trace.get_tracer("ferrule.cache", tracer_provider=tracer_provider)

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def backend(self) -> CacheBackend:
        return self._backend

    # -- reads ---------------------------------------------------------------------

    async def get_or_load(self, key: CacheKey, loader: Loader, ttl: float) -> bytes | None:
        """The cached value of ``key``, or ``loader()``'s result, stored for ``ttl`` seconds.

        Concurrent misses of one key in this process share one ``loader()`` call, which
        runs in a task owned by the cache: it must not rely on anything whose lifetime is
        the calling RPC (open its own session), because a waiter that is cancelled does
        not cancel the load for the others. The load is cancelled only when every waiter
        has gone. Exceptions from ``loader`` propagate to every waiter and are not cached.
        """
        if not trace.get_current_span().is_recording():
            # Untraced (the common case): no span, and no context manager around the read
            # either, as this runs on every cached Get.
            return (await self._get_or_load(key, loader, ttl))[1]
        with self._span("cache get_or_load", key) as span:
            outcome, value = await self._get_or_load(key, loader, ttl)
            if span is not None:
                span.set_attribute("ferrule.cache.result", outcome)
            return value

    @contextlib.contextmanager
    def _span(self, name: str, key: CacheKey | None, tenant: str = "") -> Iterator[Span | None]:
        """A span for a cache call, only inside a recording (traced) span, as for SQL
        statements: untraced calls skip even a non-recording span's cost on every hit."""
        if not trace.get_current_span().is_recording():
            yield None
            return
        attributes = {
            "ferrule.cache.backend": self._backend.name,
            "ferrule.tenant": key.tenant if key is not None else tenant,
        }
        if key is not None:
            attributes["ferrule.cache.kind"] = key.kind
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    async def _get_or_load(
        self, key: CacheKey, loader: Loader, ttl: float
    ) -> tuple[str, bytes | None]:
        """(outcome, value); outcome is ``hit``, ``miss`` or ``bypass`` for the span.

        Bypassed reads (backend unavailable) still share one load per key, so an outage
        does not turn a hot key into a stampede on the database."""
        rendered = key.render(self._prefix)
        # Nothing pending (the common case): trusted without awaiting the replay.
        if not key.cacheable or (self._pending and not await self._backend_trusted()):
            self._counters.bypassed += 1
            return "bypass", await self._join_flight(rendered, lambda: self._load(loader))
        try:
            value = await self._backend.get(rendered, ttl_to_ms(ttl))
        except CacheBackendError as exc:
            self._failed(exc)
            self._counters.bypassed += 1
            return "bypass", await self._join_flight(rendered, lambda: self._load(loader))
        if value is not None:
            self._counters.hits += 1
            return "hit", value
        self._counters.misses += 1
        return "miss", await self._join_flight(
            rendered, lambda: self._load_and_fill(key, rendered, loader, ttl)
        )

    async def _join_flight(
        self, rendered: str, start: Callable[[], Coroutine[Any, Any, bytes | None]]
    ) -> bytes | None:
        """Wait for this process's load of ``rendered``, starting it if there is none."""
        flight = self._flights.get(rendered)
        if flight is None:
            task = asyncio.get_running_loop().create_task(start())
            flight = _Flight(task)
            self._flights[rendered] = flight
            task.add_done_callback(functools.partial(self._end_flight, rendered, flight))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # Every waiter was cancelled: nobody wants the result, stop the query.
                # Unlist it first so that a new caller starts a fresh load instead of
                # joining one that is being cancelled.
                self._end_flight(rendered, flight)
                flight.task.cancel()

    def _end_flight(self, rendered: str, flight: _Flight, _task: object = None) -> None:
        if self._flights.get(rendered) is flight:
            del self._flights[rendered]
        if flight.task.done() and not flight.task.cancelled():
            flight.task.exception()  # retrieved: waiters (if any) got it already

    async def _load(self, loader: Loader) -> bytes | None:
        self._counters.loads += 1
        return await loader()

    async def _load_and_fill(
        self, key: CacheKey, rendered: str, loader: Loader, ttl: float
    ) -> bytes | None:
        """Take the key's lease, load, and store the value only if the lease survived.

        If another process holds the lease, poll for its value for up to
        ``lock_wait_ms`` (taking the lease over if it is released), then load anyway
        without storing: the other process will store it.
        """
        lease_key = key.render_lease(self._prefix)
        token = uuid.uuid4().hex
        try:
            value, leased = await self._backend.claim(rendered, lease_key, token, self._lease_ms)
            if value is None and not leased:
                value, leased = await self._await_other_loader(rendered, lease_key, token)
            if value is not None:
                return value  # another process filled it since our read
        except CacheBackendError as exc:
            self._failed(exc)
            return await self._load(loader)
        if not leased:
            return await self._load(loader)
        try:
            value = await self._load(loader)
        except BaseException:
            self._spawn(self._release_quietly(lease_key, token))
            raise
        if value is None:
            self._spawn(self._release_quietly(lease_key, token))
            return None
        try:
            await self._backend.fill(rendered, lease_key, token, value, ttl_to_ms(ttl))
        except CacheBackendError as exc:
            self._failed(exc)
        return value

    async def _await_other_loader(
        self, rendered: str, lease_key: str, token: str
    ) -> tuple[bytes | None, bool]:
        """Poll until the lease holder's value appears, (value, False); or the lease is
        free and now ours, (None, True); or the wait bound passes, (None, False)."""
        deadline = time.monotonic() + self._lock_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(self._poll)
            value, leased = await self._backend.claim(rendered, lease_key, token, self._lease_ms)
            if value is not None or leased:
                return value, leased
        return None, False

    async def _release_quietly(self, lease_key: str, token: str) -> None:
        try:
            await self._backend.release_lease(lease_key, token)
        except CacheBackendError as exc:
            self._failed(exc)  # the lease expires by itself after lease_ms

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- writes --------------------------------------------------------------------

    async def invalidate(self, *keys: CacheKey) -> None:
        """Delete ``keys`` (and their leases, so in-flight loads cannot store stale
        values). Call it after the write commits and before the write RPC returns."""
        rendered: list[str] = []
        for key in keys:
            entry = key.render(self._prefix)
            # Loads already in flight may have read the old row: their current waiters
            # keep them, but later callers (this writer's next read) must start afresh.
            self._flights.pop(entry, None)
            rendered += [entry, key.render_lease(self._prefix)]
        if not rendered:
            return
        with self._span("cache invalidate", keys[0]):
            if await self._backend_trusted() and await self._retried(
                lambda: self._backend.delete(*rendered)
            ):
                return
            self._remember(keys=rendered)

    async def generation(self, tenant_key: str) -> int:
        """The tenant's current generation; :data:`UNKNOWN_GENERATION` if the backend
        cannot say (keys built with it are loaded, never cached)."""
        counter = generation_key(self._prefix, tenant_key)
        if not await self._backend_trusted():
            return UNKNOWN_GENERATION
        try:
            return await self._backend.read_counter(counter, _initial_generation())
        except CacheBackendError as exc:
            self._failed(exc)
            return UNKNOWN_GENERATION

    async def peek_generation(self, tenant_key: str) -> int | None:
        """The counter if it exists (None if never bumped nor read), without creating it;
        :data:`UNKNOWN_GENERATION` if the backend cannot say."""
        if not await self._backend_trusted():
            return UNKNOWN_GENERATION
        try:
            return await self._backend.peek_counter(generation_key(self._prefix, tenant_key))
        except CacheBackendError as exc:
            self._failed(exc)
            return UNKNOWN_GENERATION

    async def versioned_key(self, kind: str, tenant: str, ident: str) -> CacheKey:
        """A statistics/list key under ``tenant``'s current generation."""
        return CacheKey(kind, tenant, ident, await self.generation(tenant))

    async def bump(self, *tenant_keys: str) -> None:
        """Advance the generations, so every key built with an older one is unreachable
        (and expires by its TTL). Call it on every write that can change them."""
        counters = [generation_key(self._prefix, t) for t in tenant_keys]
        if not counters:
            return
        with self._span("cache bump", None, tenant_keys[0]):
            if await self._backend_trusted():
                failed = [
                    counter
                    for counter in counters
                    if not await self._retried(functools.partial(self._bump_one, counter))
                ]
                if not failed:
                    return
                counters = failed
            self._remember(counters=counters)

    async def _bump_one(self, counter: str) -> None:
        await self._backend.bump_counter(counter, _initial_generation())

    async def _retried(self, write: Callable[[], Awaitable[object]]) -> bool:
        """Run an invalidating ``write``, retrying a failed attempt for up to
        ``invalidation_retry_ms``; False if it never succeeded (or the breaker opened).

        A read that fails only costs a database query, but an invalidation that fails
        leaves the other processes serving the old value (from Redis and from their
        near caches) until this process replays it, after its write has answered; a
        single call timing out on a busy machine must not be enough for that."""
        deadline = time.monotonic() + self._invalidation_retry
        while True:
            try:
                await write()
                return True
            except CacheBackendError as exc:
                self._failed(exc)
                if isinstance(exc, CacheUnavailable) or time.monotonic() >= deadline:
                    return False
            await asyncio.sleep(self._poll)

    # -- failure handling ----------------------------------------------------------

    def _failed(self, exc: CacheBackendError) -> None:
        if not isinstance(exc, CacheUnavailable):
            self._counters.errors += 1
            log.debug("cache backend call failed: %s", exc)

    def _remember(self, *, keys: Sequence[str] = (), counters: Sequence[str] = ()) -> None:
        for name in keys:
            self._add_pending(name, self._pending.keys)
        for name in counters:
            self._add_pending(name, self._pending.counters)

    def _add_pending(self, name: str, target: set[str]) -> None:
        if name in target:
            return
        if len(self._pending) >= self._max_pending:
            self._counters.lost_invalidations += 1
            log.warning("cache invalidation dropped: pending replay queue is full")
            return
        target.add(name)

    async def _backend_trusted(self) -> bool:
        """True if reads may use the backend: nothing failed to invalidate, or the
        replay of what failed has just succeeded."""
        if not self._pending:
            return True
        keys, counters = set(self._pending.keys), set(self._pending.counters)
        try:
            if keys:
                await self._backend.delete(*keys)
            self._pending.keys -= keys
            for counter in counters:
                await self._backend.bump_counter(counter, _initial_generation())
                self._pending.counters.discard(counter)
        except CacheBackendError as exc:
            self._failed(exc)
            return False
        return not self._pending

    # -- operations ----------------------------------------------------------------

    def stats(self) -> CacheStats:
        c = self._counters
        near = self._backend.near
        return CacheStats(
            backend=self._backend.name,
            hits=c.hits,
            misses=c.misses,
            bypassed=c.bypassed,
            errors=c.errors,
            loads=c.loads,
            degraded=self._backend.degraded or bool(self._pending),
            pending_invalidations=len(self._pending),
            lost_invalidations=c.lost_invalidations,
            near_hits=near.hits if near is not None else 0,
            near_entries=len(near) if near is not None else 0,
            near_tracking=near.active if near is not None else False,
        )

    async def ping(self) -> bool:
        """Whether the backend answers now (for health); never raises."""
        try:
            await self._backend.ping()
        except CacheBackendError:
            return False
        return True

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.task.cancel()
        pending = [f.task for f in self._flights.values()] + list(self._background)
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        await self._backend.close()
