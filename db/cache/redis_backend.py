"""Redis backend: bounded per-call timeouts, a circuit breaker, and cancellation safety.

Cancellation: redis-py has shipped bugs where cancelling a task mid-command left its
pooled connection with an unread reply, so the next command on that connection read the
previous command's answer (redis/redis-py#2624, #2665, CVE-2023-28858/28859). Current
redis-py disconnects on any BaseException in ``read_response``, but that guard lives deep
in the client and has regressed before. Here no caller ever cancels a command at all:
each command runs in its own task, and the caller awaits it through ``asyncio.shield``.
A cancelled or timed-out caller walks away; the command still reads its whole reply (or
hits redis-py's own socket timeout, which disconnects), then returns its connection to
the pool in step. The inner task is bounded by the socket and pool timeouts, so an
abandoned command cannot linger longer than a few timeouts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from db.cache.breaker import CircuitBreaker
from db.cache.errors import CacheBackendError, CacheUnavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

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


class RedisBackend:
    """A :class:`~db.cache.backend.CacheBackend` over one ``redis.asyncio`` pool.

    ``timeout_ms`` bounds each call as the caller sees it and is also the socket,
    connect and pool-checkout timeout, so nothing waits on Redis for long. redis-py's
    own retries are off: a retry would multiply the timeout, and the caller has a
    database to fall back on.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: int,
        max_connections: int = 64,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if timeout_ms < 1:
            raise ValueError("timeout_ms must be at least 1")
        self._timeout = timeout_ms / 1000
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=self._timeout,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._breaker = breaker or CircuitBreaker()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._claim = self._client.register_script(_CLAIM)
        self._fill = self._client.register_script(_FILL)
        self._release = self._client.register_script(_RELEASE)
        self._read_counter = self._client.register_script(_READ_COUNTER)
        self._bump_counter = self._client.register_script(_BUMP_COUNTER)

    @property
    def name(self) -> str:
        return "redis"

    @property
    def degraded(self) -> bool:
        return not self._breaker.is_closed

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def _guarded(self, command: Callable[[], Awaitable[T]]) -> T:
        """Runs inside the inner task: its outcome, not the caller's, feeds the breaker."""
        try:
            result = await command()
        except ResponseError as exc:
            # Redis answered (e.g. a script error): reachable, but the call failed.
            self._breaker.record_success()
            raise CacheBackendError(f"redis error: {exc}") from exc
        except (RedisError, OSError) as exc:
            self._breaker.record_failure()
            raise CacheBackendError(f"redis unavailable: {exc!r}") from exc
        self._breaker.record_success()
        return result

    @staticmethod
    def _reap(task: asyncio.Task[Any]) -> None:
        # Abandoned commands' failures are already counted by the breaker; reading the
        # exception keeps asyncio from logging "exception was never retrieved".
        if not task.cancelled():
            task.exception()

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        if not self._breaker.allow():
            raise CacheUnavailable("redis circuit breaker is open")
        inner = asyncio.get_running_loop().create_task(self._guarded(command))
        self._inflight.add(inner)
        inner.add_done_callback(self._inflight.discard)
        inner.add_done_callback(self._reap)
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(inner)
        except TimeoutError as exc:
            raise CacheBackendError("redis call timed out") from exc

    async def get(self, key: str) -> bytes | None:
        return cast("bytes | None", await self._call(lambda: self._client.get(key)))

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._call(lambda: self._client.delete(*keys))

    async def claim(
        self, key: str, lease_key: str, token: str, ttl_ms: int
    ) -> tuple[bytes | None, bool]:
        reply = await self._call(lambda: self._claim(keys=[key, lease_key], args=[token, ttl_ms]))
        if reply[0] == 1:
            return cast("bytes", reply[1]), False
        return None, reply[0] == 2

    async def fill(self, key: str, lease_key: str, token: str, value: bytes, ttl_ms: int) -> bool:
        result = await self._call(
            lambda: self._fill(keys=[key, lease_key], args=[token, value, ttl_ms])
        )
        return bool(result)

    async def release_lease(self, lease_key: str, token: str) -> None:
        await self._call(lambda: self._release(keys=[lease_key], args=[token]))

    async def read_counter(self, key: str, initial: int) -> int:
        result = await self._call(lambda: self._read_counter(keys=[key], args=[initial]))
        return int(result)

    async def bump_counter(self, key: str, initial: int) -> int:
        result = await self._call(lambda: self._bump_counter(keys=[key], args=[initial]))
        return int(result)

    async def peek_counter(self, key: str) -> int | None:
        value = await self.get(key)
        return None if value is None else int(value)

    async def ping(self) -> None:
        """Bypasses the breaker (health wants the truth) but feeds it: a good ping
        while degraded closes the breaker early."""
        inner = asyncio.get_running_loop().create_task(self._guarded(self._client.ping))
        self._inflight.add(inner)
        inner.add_done_callback(self._inflight.discard)
        inner.add_done_callback(self._reap)
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(inner)
        except TimeoutError as exc:
            raise CacheBackendError("redis ping timed out") from exc

    async def close(self) -> None:
        """Let abandoned commands finish (each is bounded by the timeouts), then close."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self._timeout * 4)
        for task in list(self._inflight):
            task.cancel()
        await self._client.aclose()
        await self._client.connection_pool.disconnect()
