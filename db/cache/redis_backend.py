"""Redis backend: redis-py's asyncio client, a per-call timeout, a circuit breaker, and a
near cache that Redis keeps fresh.

Calls: each one is bounded by ``timeout_ms`` as the caller sees it (waiting for a
connection and connecting included); there are no retries. redis-py closes a connection
whose command was cancelled or timed out before its reply was read, so an abandoned
reply can never reach a later command; the price of a cancellation is a reconnect.
At most ``max_connections`` calls are in flight at once (the rest wait, within their
timeout), which bounds the pool.

The breaker sees each call's outcome on the caller's side: a connection error or
timeout is a failure, an error reply (e.g. a script error) means Redis is reachable, so
it is a success even though the call fails. A cancelled call records nothing.

Near cache (``prefix`` set and ``near_cache`` on): values and generation counters read
from Redis are kept in process memory (:mod:`db.cache.near_cache`) and served from there with no
round trip while the invalidation listener (:mod:`db.cache.invalidation_listener`) is
subscribed. Redis broadcasts writes to keys under ``{prefix}:inv:`` and
``{prefix}:gen:`` only:

* counters (``{prefix}:gen:...``) are tracked directly: a bump anywhere reaches every
  process;
* entries are stored under untracked names, and every invalidation also writes (sets
  and deletes, in the same script) a *marker* ``{prefix}:inv:<entry>``, whose broadcast
  is the entry's invalidation. Fills write only the entry, so a process that loads a
  value and stores it in Redis also keeps it in its near cache: the fill does not
  broadcast an invalidation of what it just wrote (which, batched by Redis with a
  concurrent write's, could not be told apart from that write).

A writer also waits, bounded by the timeout, until its own listener has received its
invalidation: Redis sends a broadcast to every listener in one pass, so the write's RPC
then answers after every other process has been sent the invalidation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from db.cache.breaker import CircuitBreaker
from db.cache.errors import CacheBackendError, CacheUnavailable
from db.cache.invalidation_listener import InvalidationListener
from db.cache.near_cache import NearCache, Ticket
from db.cache.redis_client import RedisConnectionConfig, connection_pool

T = TypeVar("T")

# The value if there is one, else take the lease if it is free: {1, value} | {2} | {0}.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then
  return {1, v}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
return {0}
"""
# Store only if the caller's lease is still in place, then drop the lease.
_FILL = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_READ_COUNTER = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1])
  v = ARGV[1]
end
return v
"""
_BUMP_COUNTER = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call('INCR', KEYS[1])
"""
# Delete the first ARGV[1] keys; the others are markers: written and deleted at once,
# which leaves nothing behind but makes Redis broadcast their names.
_INVALIDATE = """
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('DEL', KEYS[i])
end
for i = n + 1, #KEYS do
  redis.call('SET', KEYS[i], '1')
  redis.call('DEL', KEYS[i])
end
return n
"""

DEFAULT_MAX_CONNECTIONS = 64


class RedisBackend:
    """A :class:`~db.cache.backend.CacheBackend` over redis-py (see the module docstring).

    Nothing connects here (the first call does, and starts the listener), so this is
    safe to build before the event loop runs or before a fork.
    """

    def __init__(
        self,
        config: RedisConnectionConfig | str,
        *,
        timeout_ms: int,
        breaker: CircuitBreaker | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        prefix: str | None = None,
        near_cache: bool = True,
        near_max_entries: int = 10_000,
        near_ttl_s: float = 60.0,
        listener_ping_s: float = 1.0,
    ) -> None:
        if timeout_ms < 1:
            raise ValueError("timeout_ms must be at least 1")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if isinstance(config, str):
            config = RedisConnectionConfig(config)
        self.config = config
        self._timeout = timeout_ms / 1000
        self._pool = connection_pool(config, timeout_s=self._timeout, client_name="ferrule-cache")
        self._client = Redis(connection_pool=self._pool)
        self._slots = asyncio.Semaphore(max_connections)
        self._breaker = breaker or CircuitBreaker()
        self._claim = self._client.register_script(_CLAIM)
        self._fill = self._client.register_script(_FILL)
        self._release = self._client.register_script(_RELEASE)
        self._read_counter = self._client.register_script(_READ_COUNTER)
        self._bump_counter = self._client.register_script(_BUMP_COUNTER)
        self._invalidate = self._client.register_script(_INVALIDATE)
        self._near: NearCache | None = None
        self._listener: InvalidationListener | None = None
        #: Tickets of loads that hold a lease, by lease token, until their fill.
        self._fills: dict[str, Ticket] = {}
        # Markers are written whenever the key layout is known, near cache or not, so
        # that processes configured with one hear of the writes of those without.
        self._data_root = f"{prefix}:" if prefix is not None else None
        self._marker_root = f"{prefix}:inv:"
        self._counter_root = f"{prefix}:gen:"
        if prefix is not None and near_cache:
            self._near = NearCache(near_max_entries, near_ttl_s)
            self._listener = InvalidationListener(
                connection_pool(config, timeout_s=self._timeout, client_name="ferrule-listener"),
                self._near,
                prefixes=[self._marker_root, self._counter_root],
                near_key=self._near_key,
                timeout_s=self._timeout,
                ping_interval_s=listener_ping_s,
            )

    @property
    def name(self) -> str:
        return "redis"

    @property
    def degraded(self) -> bool:
        return not self._breaker.is_closed

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    @property
    def near(self) -> NearCache | None:
        return self._near

    @property
    def listener(self) -> InvalidationListener | None:
        return self._listener

    # -- keys ------------------------------------------------------------------------

    def _near_key(self, redis_key: str) -> str | None:
        """The near-cache key an invalidated Redis key stands for."""
        if redis_key.startswith(self._marker_root):
            return f"{self._data_root}{redis_key[len(self._marker_root) :]}"
        if redis_key.startswith(self._counter_root):
            return redis_key
        return None

    def _marker(self, key: str) -> str | None:
        if self._data_root is None or not key.startswith(self._data_root):
            return None
        if key.startswith(self._counter_root):
            return None  # counters are tracked under their own name
        return self._marker_root + key[len(self._data_root) :]

    # -- calls -----------------------------------------------------------------------

    async def _call(self, call: Callable[[], Awaitable[T]], *, gated: bool = True) -> T:
        """Run one call, feeding its outcome to the breaker. ``gated``: whether an open
        breaker refuses the call."""
        if self._listener is not None:
            self._listener.start()
        if gated and not self._breaker.allow():
            raise CacheUnavailable("redis circuit breaker is open")
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    reply = await call()
        except ResponseError as exc:
            # Redis answered (e.g. a script error): reachable, but the call failed.
            self._breaker.record_success()
            raise CacheBackendError(f"redis error: {exc}") from exc
        except TimeoutError as exc:
            self._breaker.record_failure()
            raise CacheBackendError(
                f"redis unavailable: no reply within {self._timeout * 1000:g} ms"
            ) from exc
        except (RedisError, OSError) as exc:
            self._breaker.record_failure()
            raise CacheBackendError(f"redis unavailable: {exc}") from exc
        self._breaker.record_success()
        return reply

    async def _read(self, key: str, call: Callable[[], Awaitable[T]], ttl_s: float | None) -> T:
        """A read whose bytes reply may be kept in the near cache (if no invalidation
        of ``key`` arrives while it is in flight)."""
        near = self._near
        ticket = near.begin(key) if near is not None else None
        try:
            reply = await self._call(call)
            if ticket is not None and isinstance(reply, bytes):
                assert near is not None
                near.store(ticket, reply, ttl_s)
            return reply
        finally:
            if near is not None:
                near.end(ticket)

    # -- the CacheBackend operations ---------------------------------------------------

    async def get(self, key: str, ttl_ms: int | None = None) -> bytes | None:
        near = self._near
        if near is not None:
            value = near.get(key)
            if value is not None:
                return value
        ttl = None if ttl_ms is None else ttl_ms / 1000
        return cast("bytes | None", await self._read(key, lambda: self._client.get(key), ttl))

    async def delete(self, *keys: str) -> None:
        if not keys:
            return
        if self._near is not None:
            self._near.invalidate(keys)  # this process's own reads see the write at once
        markers = [m for m in map(self._marker, keys) if m is not None]
        if not markers:
            await self._call(lambda: self._client.delete(*keys))
            return
        await self._broadcast(
            markers, lambda: self._invalidate(keys=[*keys, *markers], args=[len(keys)]), keys
        )

    async def _broadcast(
        self, tracked: list[str], write: Callable[[], Awaitable[T]], near_keys: Sequence[str]
    ) -> T:
        """Run ``write`` (which modifies the ``tracked`` keys), then wait until this
        process's listener has heard of it (see the module docstring).

        ``near_keys`` are invalidated in this process again once Redis has applied the
        write: a read of this process that was answered by Redis between the caller's
        first invalidation and the write (old value, valid ticket) cannot stay in the
        near cache, whether or not the broadcast is heard in time."""
        listener = self._listener
        if listener is None:
            reply = await self._call(write)
            if self._near is not None:
                self._near.invalidate(near_keys)
            return reply
        expected = listener.expect(tracked)
        try:
            reply = await self._call(write)
        except BaseException:
            listener.forget(expected, tracked)
            raise
        if self._near is not None:
            self._near.invalidate(near_keys)
        await listener.wait_seen(expected, tracked, self._timeout)
        return reply

    async def claim(
        self, key: str, lease_key: str, token: str, ttl_ms: int
    ) -> tuple[bytes | None, bool]:
        near = self._near
        ticket = near.begin(key) if near is not None else None
        handed_over = False
        try:
            reply = cast(
                "list[int | bytes]",
                await self._call(lambda: self._claim(keys=[key, lease_key], args=[token, ttl_ms])),
            )
            if reply[0] == 1:
                value = cast("bytes", reply[1])
                if near is not None:
                    near.store(ticket, value, ttl_ms / 1000)
                return value, False
            if reply[0] == 2 and ticket is not None:
                # The load starts now: its value may be kept only if nothing
                # invalidates the key before the fill lands.
                self._fills[token] = ticket
                handed_over = True
            return None, reply[0] == 2
        finally:
            if near is not None and not handed_over:
                near.end(ticket)

    async def fill(self, key: str, lease_key: str, token: str, value: bytes, ttl_ms: int) -> bool:
        ticket = self._fills.pop(token, None)
        try:
            stored = bool(
                await self._call(
                    lambda: self._fill(keys=[key, lease_key], args=[token, value, ttl_ms])
                )
            )
            if stored and self._near is not None:
                self._near.store(ticket, value, ttl_ms / 1000)
            return stored
        finally:
            if self._near is not None:
                self._near.end(ticket)

    async def release_lease(self, lease_key: str, token: str) -> None:
        ticket = self._fills.pop(token, None)
        if self._near is not None:
            self._near.end(ticket)
        await self._call(lambda: self._release(keys=[lease_key], args=[token]))

    async def read_counter(self, key: str, initial: int) -> int:
        near = self._near
        if near is not None:
            value = near.get(key)
            if value is not None:
                return int(value)
        reply = await self._read(key, lambda: self._read_counter(keys=[key], args=[initial]), None)
        return int(cast("bytes", reply))

    async def bump_counter(self, key: str, initial: int) -> int:
        if self._near is not None:
            self._near.invalidate((key,))
        return int(
            await self._broadcast(
                [key], lambda: self._bump_counter(keys=[key], args=[initial]), (key,)
            )
        )

    async def peek_counter(self, key: str) -> int | None:
        value = await self.get(key)
        return None if value is None else int(value)

    async def ping(self) -> None:
        """Bypasses the breaker (health wants the truth) but feeds it: a good ping
        while degraded closes the breaker early."""
        await self._call(lambda: self._client.ping(), gated=False)

    async def close(self) -> None:
        """Close every connection (and the listener); later calls fail."""
        if self._listener is not None:
            await self._listener.close()
        await self._client.aclose()
        await self._pool.aclose()  # a pool handed to the client is not closed with it
        self._fills.clear()
