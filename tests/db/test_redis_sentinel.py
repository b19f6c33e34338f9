"""The cache through Redis Sentinel: a master, a replica and a sentinel started by the test
(Debian's redis-server and redis-sentinel on free ports), then a forced failover
(SENTINEL FAILOVER) after which reads, writes and the near cache keep working against
the promoted replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from db.cache import Cache, CacheKey, create_cache
from db.cache.redis_backend import RedisBackend
from db.cache.redis_client import RedisConnectionConfig
from tests.db.cache_fixtures import RedisProcess, free_port

SERVICE = "ferrule-test"
PREFIX = "sentinel"


class SentinelProcess:
    """A redis-sentinel watching one master, with a quorum of one."""

    def __init__(self, directory: Path, master_port: int) -> None:
        self.port = free_port()
        self._config = directory / "sentinel.conf"
        self._config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        self._proc = subprocess.Popen(
            [binary, str(self._config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: self.master_port() is not None, "the sentinel to answer")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)

    def master_port(self) -> int | None:
        with contextlib.suppress(redis.RedisError), self.client() as sentinel:
            address = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            return int(address[1]) if address else None
        return None

    def promotable_replicas(self) -> int:
        """Replicas the sentinel has seen with a live link to the master."""
        with self.client() as sentinel:
            replicas = sentinel.sentinel_slaves(SERVICE)
        live = [r for r in replicas if r.get("is_slave") and not r.get("is_disconnected")]
        return sum(r.get("master-link-status") == "ok" for r in live)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            self._proc = None


def wait_for(predicate: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


_SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess, SentinelProcess]]:
    # A master waits repl-diskless-sync-delay (5 s by default) for more replicas before
    # it sends one its data: the replica, then the demoted master after the failover.
    master = RedisProcess(*_SYNC_AT_ONCE)
    master.start()
    replica = RedisProcess(*_SYNC_AT_ONCE, "--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    sentinel = SentinelProcess(tmp_path, master.port)
    try:
        sentinel.start()
        wait_for(lambda: sentinel.promotable_replicas() == 1, "the sentinel to see the replica")
        yield master, replica, sentinel
    finally:
        sentinel.kill()
        replica.kill()
        master.kill()


def key() -> CacheKey:
    return CacheKey("user", "org-1", "organizations/org-1/users/u1")


def loader(value: bytes) -> Callable[[], Awaitable[bytes]]:
    async def load() -> bytes:
        return value

    return load


async def read(cache: Cache, value: bytes) -> bytes | None:
    return await cache.get_or_load(key(), loader(value), ttl=60)


async def test_cache_through_sentinel_survives_a_failover(
    cluster: tuple[RedisProcess, RedisProcess, SentinelProcess],
) -> None:
    master, replica, sentinel = cluster
    config = RedisConnectionConfig(
        url=None, sentinels=(("127.0.0.1", sentinel.port),), sentinel_service=SERVICE
    )
    cache = create_cache(
        config, prefix=PREFIX, timeout_ms=500, local_max_entries=1, breaker_cooldown_s=0.2
    )
    backend = cache.backend
    assert isinstance(backend, RedisBackend)
    near, listener = backend.near, backend.listener
    assert near is not None
    assert listener is not None
    try:
        assert await read(cache, b"v1") == b"v1"
        with redis.Redis(port=master.port) as direct:
            assert direct.get(key().render(PREFIX)) == b"v1"  # on the master
        deadline = time.monotonic() + 10
        while not near.active:
            assert time.monotonic() < deadline, "the listener never subscribed"
            await asyncio.sleep(0.05)
        assert await read(cache, b"unused") == b"v1"

        subscriptions = listener.subscriptions
        with sentinel.client() as admin:
            assert admin.execute_command("SENTINEL", "FAILOVER", SERVICE)
        await asyncio.to_thread(
            wait_for, lambda: sentinel.master_port() == replica.port, "the failover"
        )
        with redis.Redis(port=replica.port) as promoted, redis.Redis(port=master.port) as old:
            await asyncio.to_thread(
                wait_for, lambda: promoted.info("replication")["role"] == "master", "promotion"
            )
            # Until Sentinel demotes the old master (and closes its clients), clients that
            # are still connected keep writing to it: a window every Sentinel client has.
            await asyncio.to_thread(
                wait_for, lambda: old.info("replication")["role"] == "slave", "the demotion"
            )

        # Every read stays right through the switch (the database answers while Redis
        # cannot); the write's invalidation lands on the new master.
        await cache.invalidate(key())
        assert await read(cache, b"v2") == b"v2"
        deadline = time.monotonic() + 20
        while True:
            assert await read(cache, b"v2") == b"v2"
            await cache.invalidate(key())  # retried until Redis takes it
            assert await read(cache, b"v2") == b"v2"
            if not cache.stats().degraded and cache.stats().pending_invalidations == 0:
                break
            assert time.monotonic() < deadline, cache.stats()
            await asyncio.sleep(0.1)
        # The near cache is back, tracking the new master.
        while not (near.active and listener.subscriptions > subscriptions):
            assert time.monotonic() < deadline, "tracking was not re-established"
            await asyncio.sleep(0.05)
        with redis.Redis(port=replica.port) as promoted:
            clients = promoted.client_list()
        assert {"ferrule-cache", "ferrule-listener"} <= {c.get("name") for c in clients}
        assert await read(cache, b"v3") == b"v2"
        hits = near.hits
        assert await read(cache, b"v3") == b"v2"
        assert near.hits == hits + 1
        # A write on the new master reaches this near cache (the entry's marker).
        with redis.Redis(port=replica.port) as promoted:
            promoted.set(f"{PREFIX}:inv:" + key().render(PREFIX).removeprefix(f"{PREFIX}:"), 1)
        deadline = time.monotonic() + 5
        while near.get(key().render(PREFIX)) is not None:
            assert time.monotonic() < deadline, "an invalidation on the new master was missed"
            await asyncio.sleep(0.02)
    finally:
        await cache.close()
