"""The connection on which Redis tells this process which cached keys changed.

One dedicated RESP2 connection per process:

1. ``CLIENT ID``, then ``CLIENT TRACKING on REDIRECT <its own id> BCAST PREFIX ...``:
   in broadcasting mode Redis reports every write to a key under the prefixes, whoever
   made it and whether or not this process read the key, so the connections that serve
   reads need no tracking of their own. Tracking on the listener itself, redirected to
   itself, means tracking and listening live and die together: there is no state where
   one connection is tracked while the connection that should hear about it is gone
   (in RESP2 Redis would drop those invalidations silently).
2. ``SUBSCRIBE __redis__:invalidate``: a RESP2 connection receives redirected
   invalidations as Pub/Sub messages (redis-py's RESP3 path does not hand push frames
   to a reader, so RESP3 would lose them).

The near cache is active only between a confirmed subscription and the loss of the
connection; it is flushed at both ends. A ``PING`` every ``ping_interval_s`` without a
reply within another interval counts as a loss (a hung Redis or a dead link sends no
reset). Reconnection backs off up to ``max_backoff_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError

from db.background_tasks import cancel_and_wait
from db.cache.near_cache import NearCache

log = logging.getLogger(__name__)

CHANNEL = b"__redis__:invalidate"


class InvalidationListener:
    """Keeps ``near`` in step with Redis; ``near_key`` maps an invalidated Redis key to
    the near-cache key it stands for (None: not one of ours)."""

    def __init__(
        self,
        pool: ConnectionPool,
        near: NearCache,
        *,
        prefixes: Sequence[str],
        near_key: Callable[[str], str | None],
        timeout_s: float,
        ping_interval_s: float = 1.0,
        max_backoff_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self._near = near
        self._prefixes = list(prefixes)
        self._near_key = near_key
        self._timeout = timeout_s
        self._ping_interval = ping_interval_s
        self._max_backoff = max_backoff_s
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Subscriptions made (1 after the first, +1 per reconnection), for health and tests.
        self.subscriptions = 0
        self.client_id: int | None = None
        #: Writes whose broadcast was not heard within the timeout.
        self.broadcasts_missed = 0
        self._seen: dict[str, list[asyncio.Future[None]]] = {}

    def start(self) -> None:
        """Start listening (idempotent; needs the running loop)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def expect(self, keys: Sequence[str]) -> asyncio.Future[None] | None:
        """Register interest in the invalidation of any of ``keys``, *before* the write
        that causes it is sent (its broadcast may be handled before the write's reply
        reaches the writer). None while not subscribed: nothing to wait for."""
        if not keys or not self._near.active:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._seen.setdefault(key, []).append(future)
        return future

    async def wait_seen(
        self, future: asyncio.Future[None] | None, keys: Sequence[str], timeout_s: float
    ) -> bool:
        """Until this listener has received the invalidation :meth:`expect` registered
        (Redis sends each broadcast to every listener in one pass, so by then the other
        processes' listeners have it too), or the listener is lost, or the timeout."""
        if future is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await future
            return True
        except TimeoutError:
            self.broadcasts_missed += 1
            log.warning("cache invalidation broadcast not heard within %g s", timeout_s)
            return False
        finally:
            self.forget(future, keys)

    def forget(self, future: asyncio.Future[None] | None, keys: Sequence[str]) -> None:
        """Drop what :meth:`expect` registered (the write failed or was waited for)."""
        if future is None:
            return
        for key in keys:
            waiting = self._seen.get(key)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(future)
                if not waiting:
                    del self._seen[key]

    def _wake(self, keys: Sequence[str] | None) -> None:
        if keys is None:
            woken = [f for waiting in self._seen.values() for f in waiting]
            self._seen.clear()
        else:
            woken = [f for key in keys for f in self._seen.pop(key, ())]
        for future in woken:
            if not future.done():
                future.set_result(None)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                async with asyncio.timeout(self._timeout * 4):
                    connection = await self._connect()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("cache invalidation listener cannot connect: %s", exc)
            else:
                try:
                    await self._subscribe(connection)
                    backoff = 0.05
                    await self._listen(connection)
                except (RedisError, OSError, TimeoutError) as exc:
                    if not self._closed:
                        log.warning("cache invalidation listener lost: %s", exc)
                finally:
                    self._lost()
                    await asyncio.shield(self._drop(connection))
            if self._closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _connect(self) -> AbstractConnection:
        # redis-py does not annotate get_connection; the variable gives it a type.
        get_connection: Callable[[], Awaitable[AbstractConnection]] = self._pool.get_connection
        return await get_connection()

    async def _drop(self, connection: AbstractConnection) -> None:
        with contextlib.suppress(RedisError, OSError):
            await connection.disconnect()
        with contextlib.suppress(RedisError, OSError, KeyError):
            await self._pool.release(connection)

    def _lost(self) -> None:
        near = self._near
        near.active = False
        near.flush()
        self.client_id = None
        self._wake(None)

    async def _subscribe(self, connection: AbstractConnection) -> None:
        async with asyncio.timeout(self._timeout * 4):
            await connection.send_command("CLIENT", "ID")
            client_id = int(await connection.read_response())
            tracking: list[str | int] = ["CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST"]
            for prefix in self._prefixes:
                tracking += ["PREFIX", prefix]
            await connection.send_command(*tracking)
            await connection.read_response()
            await connection.send_command("SUBSCRIBE", CHANNEL)
            reply = await connection.read_response()
        if not (isinstance(reply, list) and reply[:2] == [b"subscribe", CHANNEL]):
            raise RedisError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        # Whatever was cached before this point may have missed invalidations.
        self._near.flush()
        self._near.active = True
        self.client_id = client_id
        self.subscriptions += 1

    async def _listen(self, connection: AbstractConnection) -> None:
        awaiting_pong = False
        while not self._closed:
            message = await connection.read_response(timeout=self._ping_interval)
            if message is None:  # quiet for a whole interval
                if awaiting_pong:
                    raise TimeoutError("the listener's PING got no reply")
                await connection.send_command("PING")
                awaiting_pong = True
                continue
            if not isinstance(message, list) or not message:
                raise RedisError(f"unexpected message on the listener: {message!r}")
            kind = message[0]
            if kind == b"pong":
                awaiting_pong = False
            elif kind == b"message" and message[1] == CHANNEL:
                self._invalidated(message[2])

    def _invalidated(self, payload: object) -> None:
        if payload is None:  # FLUSHDB / FLUSHALL: everything is gone
            self._near.flush()
            self._wake(None)
            return
        assert isinstance(payload, list)
        redis_keys = [k.decode() if isinstance(k, bytes) else str(k) for k in payload]
        near_keys = [n for n in (self._near_key(k) for k in redis_keys) if n is not None]
        self._near.invalidate(near_keys)
        self._wake(redis_keys)

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        self._lost()
        await self._pool.aclose()
