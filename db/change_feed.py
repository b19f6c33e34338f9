"""Change notifications for watch streams: which resources a committed write touched,
carried to every server process, and the per-process wake-up flags of the watchers.

A notification is a hint, never data: ``{organization}/{kind}/{resource id or empty}``.
A watcher woken by one re-reads the resource through the tenant-scoped repositories
(level-triggered), so a notification can neither leak another tenant's rows nor, when
lost or duplicated, make a watcher deliver a wrong state. What a transport must
guarantee is only this: every change committed after a watcher subscribed wakes it at
least once *after* the commit. Where that cannot be known (a lost LISTEN or pub/sub
connection), every watcher of the process is woken so it re-reads.

Transports, one per process, chosen by :func:`create_change_feed`:

* PostgreSQL: ``pg_notify`` inside the writing transaction (PostgreSQL delivers it at
  commit and drops it on rollback, and deduplicates repeats within one transaction) and
  one dedicated asyncpg connection per process that LISTENs, reconnecting with backoff.
* Redis (other databases with ``REDIS_URL``): PUBLISH after the transaction ends, one
  pub/sub connection per process. A write that commits and then loses its process before
  publishing is missed until the watcher's next wake-up; PostgreSQL's NOTIFY has no
  such window.
* In-process (the embedded default, one process): dispatched after the transaction ends.

Memory per watcher is one flag, whatever the rate of changes: many changes before the
watcher re-reads coalesce into one re-read of the latest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncSession

from db.background_tasks import cancel_and_wait
from db.cache.redis_client import RedisConnectionConfig, connection_pool

log = logging.getLogger(__name__)

#: The PostgreSQL channel and the Redis pub/sub channel (prefixed by the cache prefix).
CHANNEL = "ferrule_changes"
#: The LISTEN connection's name in pg_stat_activity.
LISTENER_APPLICATION_NAME = "ferrule-change-listener"
ANALYSIS = "analysis"
BATCH = "batch"
PREDICTIONS = "predictions"
_RECONNECT_MIN_S = 0.1
_RECONNECT_MAX_S = 5.0
#: How often an idle LISTEN connection is checked (a dead peer sends no FIN).
_KEEPALIVE_S = 5.0


@dataclass(frozen=True, slots=True)
class Change:
    """``resource_id`` None: some resource of ``kind`` in the organization (a create)."""

    organization_id: uuid.UUID
    kind: str
    resource_id: uuid.UUID | None = None

    def payload(self) -> str:
        return f"{self.organization_id}/{self.kind}/{self.resource_id or ''}"

    @classmethod
    def parse(cls, payload: str) -> Change | None:
        try:
            org, kind, ident = payload.split("/")
            return cls(uuid.UUID(org), kind, uuid.UUID(ident) if ident else None)
        except ValueError:
            return None


class Subscription:
    """One watcher's wake-up flag. It matches a change of its organization whose kind is
    in ``kinds`` and, when ``resource_id`` is set, whose resource is that one or unnamed."""

    __slots__ = ("_event", "kinds", "organization_id", "resource_id")

    def __init__(
        self, organization_id: uuid.UUID, kinds: frozenset[str], resource_id: uuid.UUID | None
    ) -> None:
        self.organization_id = organization_id
        self.kinds = kinds
        self.resource_id = resource_id
        self._event = asyncio.Event()

    def matches(self, change: Change) -> bool:
        if change.kind not in self.kinds:
            return False
        return self.resource_id is None or change.resource_id in (None, self.resource_id)

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        """Until woken since the last wait; clears the flag so the next change wakes again
        (a change that lands during the caller's re-read sets it for the next round)."""
        await self._event.wait()
        self._event.clear()


class ChangeFeed:
    """The process's watchers by organization, and the transport that feeds them."""

    def __init__(self) -> None:
        self._by_organization: dict[uuid.UUID, set[Subscription]] = {}
        self._dispatched = 0

    @property
    def dispatched(self) -> int:
        """Notifications received (from any process), for tests and health."""
        return self._dispatched

    @property
    def subscriptions(self) -> int:
        return sum(len(s) for s in self._by_organization.values())

    @contextlib.contextmanager
    def subscribe(
        self,
        organization_id: uuid.UUID,
        kinds: Iterable[str],
        resource_id: uuid.UUID | None = None,
    ) -> Iterator[Subscription]:
        """Subscribe *before* the first read: a change committed between the read and the
        subscription would otherwise go unseen."""
        sub = Subscription(organization_id, frozenset(kinds), resource_id)
        self._by_organization.setdefault(organization_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._by_organization.get(organization_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_organization[organization_id]

    def dispatch(self, change: Change) -> None:
        self._dispatched += 1
        for sub in self._by_organization.get(change.organization_id, ()):
            if sub.matches(change):
                sub.wake()

    def wake_all(self) -> None:
        """After notifications may have been lost: every watcher re-reads."""
        for subs in self._by_organization.values():
            for sub in subs:
                sub.wake()

    # --- transport ----------------------------------------------------------------------
    async def stage(self, session: AsyncSession, changes: Iterable[Change]) -> None:
        """Inside the writing transaction, before its commit."""

    async def committed(self, changes: Iterable[Change]) -> None:
        """After the writing transaction ended (committed, or possibly so)."""
        for change in changes:
            self.dispatch(change)

    async def start(self) -> None:
        """Begin listening (a no-op in process)."""

    async def close(self) -> None:
        """Stop listening."""


class _ListeningChangeFeed(ChangeFeed):
    """A transport with one listening connection per process: :meth:`_listen` connects
    and returns (or raises one of :attr:`_transient_errors`) when the connection is lost;
    this reconnects with backoff. Every watcher is woken on each (re)connection and after
    each loss, since what was committed while nothing listened was not heard."""

    #: The listener's name in logs.
    _listener_name = "change listener"
    _transient_errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self) -> None:
        super().__init__()
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="ferrule-change-listener")

    async def wait_listening(self) -> None:
        await self._listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _listen(self, listening: Callable[[], None]) -> None:
        """Connect, subscribe, call ``listening()``, then dispatch until the connection
        is lost; release the connection on the way out."""
        raise NotImplementedError

    async def _listen_forever(self) -> None:
        backoff = _RECONNECT_MIN_S

        def listening() -> None:
            nonlocal backoff
            backoff = _RECONNECT_MIN_S
            self.wake_all()
            self._listening.set()

        while True:
            try:
                await self._listen(listening)
            except asyncio.CancelledError:
                raise
            except self._transient_errors as exc:
                log.warning("%s: %s; reconnecting", self._listener_name, type(exc).__name__)
            finally:
                self._listening.clear()
            self.wake_all()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RECONNECT_MAX_S)


class PostgresChangeFeed(_ListeningChangeFeed):
    """NOTIFY in the writing transaction; one LISTEN connection per process."""

    _transient_errors = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

    def __init__(self, database_url: str) -> None:
        super().__init__()
        # asyncpg speaks libpq's URL form; the SQLAlchemy driver suffix is not part of it.
        self._dsn = make_url(database_url).set(drivername="postgresql")
        #: Bumped on every (re)connection, so tests can tell a reconnect happened.
        self.connections = 0

    async def stage(self, session: AsyncSession, changes: Iterable[Change]) -> None:
        for change in changes:
            await session.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": change.payload()},
            )

    async def committed(self, changes: Iterable[Change]) -> None:
        """Delivered by PostgreSQL, to this process too, through the LISTEN connection."""

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        change = Change.parse(payload)
        if change is not None:
            self.dispatch(change)

    async def _listen(self, listening: Callable[[], None]) -> None:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(
                self._dsn.render_as_string(hide_password=False),
                timeout=10,
                server_settings={"application_name": LISTENER_APPLICATION_NAME},
            )
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await conn.add_listener(CHANNEL, self._on_notification)
            self.connections += 1
            listening()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_KEEPALIVE_S):
                        await lost.wait()
                if not lost.is_set():
                    await conn.execute("SELECT 1", timeout=_KEEPALIVE_S)
        finally:
            if conn is not None:
                conn.terminate()


class RedisChangeFeed(_ListeningChangeFeed):
    """PUBLISH after the transaction; one pub/sub connection per process."""

    _listener_name = "change subscriber"
    _transient_errors = (redis.exceptions.RedisError, OSError)

    def __init__(self, config: RedisConnectionConfig, prefix: str, timeout_s: float) -> None:
        super().__init__()
        self._channel = f"{prefix}{CHANNEL}"
        self._publisher = aioredis.Redis(
            connection_pool=connection_pool(
                config, timeout_s=timeout_s, client_name="ferrule-change-publisher"
            )
        )
        # The subscriber waits up to the keepalive for a message: a longer socket timeout.
        self._subscriber = aioredis.Redis(
            connection_pool=connection_pool(
                config,
                timeout_s=max(timeout_s, _KEEPALIVE_S * 2),
                client_name="ferrule-change-subscriber",
            )
        )

    async def committed(self, changes: Iterable[Change]) -> None:
        for change in changes:
            try:
                await self._publisher.publish(self._channel, change.payload())
            except (redis.exceptions.RedisError, OSError) as exc:
                # Local watchers still learn of it; remote ones on their next wake-up.
                log.warning("change publish failed: %s", type(exc).__name__)
                self.dispatch(change)

    async def close(self) -> None:
        await super().close()
        await self._publisher.aclose()
        await self._subscriber.aclose()

    async def _listen(self, listening: Callable[[], None]) -> None:
        pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            listening()
            while True:
                message = await pubsub.get_message(timeout=_KEEPALIVE_S)
                if message is None:
                    await pubsub.ping()
                    continue
                data = message.get("data")
                if isinstance(data, bytes):
                    change = Change.parse(data.decode("utf-8", "replace"))
                    if change is not None:
                        self.dispatch(change)
        finally:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await pubsub.aclose()


def create_change_feed(
    database_url: str,
    redis: RedisConnectionConfig | None,
    *,
    redis_prefix: str,
    redis_timeout_s: float,
) -> ChangeFeed:
    """PostgreSQL's own NOTIFY when the database is PostgreSQL; else Redis pub/sub when
    Redis is configured; else in-process (one process: the embedded default)."""
    if make_url(database_url).get_backend_name() == "postgresql":
        return PostgresChangeFeed(database_url)
    if redis is not None:
        return RedisChangeFeed(redis, redis_prefix, redis_timeout_s)
    return ChangeFeed()
