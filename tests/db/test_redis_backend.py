"""RedisBackend on redis-py, against real Redis servers only: where Redis is (URLs with
AUTH and SELECT, TLS with a CA and a client certificate, unix sockets), error replies, a
hung server, many concurrent calls, and cancellation at random points.

Tests that restart, pause, reconfigure or count connections on a server run their own
redis-server; the rest use the shared one under a private key prefix.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from db.cache import (
    BreakerState,
    CacheBackendError,
    CacheKey,
    CacheUnavailable,
    CircuitBreaker,
    create_cache,
)
from db.cache.redis_backend import RedisBackend
from db.cache.redis_client import RedisConnectionConfig, parse_sentinels
from tests.client.certs import CertificateAuthority
from tests.db.cache_fixtures import RedisProcess, free_port
from tests.polling import DEADLINE_S

TIMEOUT_MS = 100


@pytest.fixture
async def namespace(redis_url: str, redis_namespace: str) -> AsyncIterator[str]:
    """A key prefix on the shared Redis, deleted afterwards."""
    yield redis_namespace
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{redis_namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def make_backend(
    config: RedisConnectionConfig | str,
    *,
    timeout_ms: int = TIMEOUT_MS,
    failure_threshold: int = 1000,
    max_connections: int = 64,
) -> RedisBackend:
    """A backend whose breaker, by default, never opens (so every call reaches Redis)."""
    breaker = CircuitBreaker(failure_threshold=failure_threshold, cooldown_s=60)
    return RedisBackend(
        config, timeout_ms=timeout_ms, breaker=breaker, max_connections=max_connections
    )


async def store(backend: RedisBackend, key: str, value: bytes) -> None:
    """Write through the backend (it has no SET): take the key's lease, then fill it."""
    token = uuid.uuid4().hex
    assert await backend.claim(key, f"{key}:lease", token, 5_000) == (None, True)
    assert await backend.fill(key, f"{key}:lease", token, value, 60_000)


def connections_received(port: int) -> int:
    """How many connections this redis-server has accepted since it started."""
    with redis.Redis(port=port) as admin:
        stats = admin.info("stats")
    return int(stats["total_connections_received"])


def cache_clients(port: int) -> list[dict[str, str]]:
    """CLIENT LIST entries of the backend's connections (named ``ferrule-cache``)."""
    with redis.Redis(port=port) as admin:
        clients = admin.client_list()
    return [c for c in clients if c.get("name") == "ferrule-cache"]


async def assert_near_cache_serves(config: RedisConnectionConfig | str) -> None:
    """Through ``config`` the invalidation listener subscribes and a repeated read is
    served from memory."""
    cache = create_cache(config, prefix="p", timeout_ms=2000, local_max_entries=1)
    backend = cache.backend
    assert isinstance(backend, RedisBackend)
    near = backend.near
    assert near is not None

    async def load() -> bytes:
        return b"loaded"

    key = CacheKey("user", "org", "u1")
    try:
        assert await cache.get_or_load(key, load, ttl=60) == b"loaded"
        for _ in range(200):
            if near.active:
                break
            await asyncio.sleep(0.01)
        assert near.active, "the invalidation listener did not subscribe"
        await cache.invalidate(key)
        assert await cache.get_or_load(key, load, ttl=60) == b"loaded"
        hits = near.hits
        assert await cache.get_or_load(key, load, ttl=60) == b"loaded"
        assert near.hits == hits + 1
    finally:
        await cache.close()


# -- where Redis is ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"url": "http://127.0.0.1:6379"},
        {"url": "redis://127.0.0.1:6379/zero"},
        {"url": None},
        {"url": None, "sentinels": (("127.0.0.1", 26379),)},  # no service name
        {"url": "rediss://127.0.0.1:6380", "tls_cert_file": "client.pem"},  # no key
    ],
)
def test_bad_settings_fail_at_construction(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        RedisConnectionConfig(**config)  # type: ignore[arg-type]


def test_sentinel_addresses_parse_with_the_default_port() -> None:
    assert parse_sentinels(["10.0.0.1:26380", "sentinel-b"]) == (
        ("10.0.0.1", 26380),
        ("sentinel-b", 26379),
    )
    for bad in ("host:port", ":26379", "host:0"):
        with pytest.raises(ValueError, match="host:port"):
            parse_sentinels([bad])


def test_construction_needs_no_event_loop_and_connects_nothing() -> None:
    # Sync test, no running loop: built before the loop runs (or before a fork).
    backend = RedisBackend("redis://127.0.0.1:1/5", timeout_ms=100, prefix="p")
    assert backend.near is not None
    assert not backend.near.active
    assert backend.config.describe() == "127.0.0.1:1"


async def test_url_database_is_selected(own_redis: RedisProcess) -> None:
    backend = make_backend(f"redis://127.0.0.1:{own_redis.port}/3")
    try:
        await store(backend, "selected", b"in db 3")
        assert await backend.get("selected") == b"in db 3"
    finally:
        await backend.close()
    with redis.Redis(port=own_redis.port, db=3) as db3:
        assert db3.get("selected") == b"in db 3"
    with redis.Redis(port=own_redis.port, db=0) as db0:
        assert db0.get("selected") is None


async def test_url_credentials_are_sent_as_auth(own_redis: RedisProcess) -> None:
    password = "p@ss:w/rd"  # percent-encoded in the URL
    with redis.Redis(port=own_redis.port) as admin:
        admin.execute_command("ACL", "SETUSER", "app", "on", f">{password}", "~*", "&*", "+@all")
        admin.config_set("requirepass", "default-pw")
    port = own_redis.port

    app = make_backend(f"redis://app:p%40ss%3Aw%2Frd@127.0.0.1:{port}/2")
    try:
        await store(app, "k", b"as app")
        with redis.Redis(port=port, password="default-pw") as admin:
            users = {c["user"] for c in admin.client_list() if c.get("name") == "ferrule-cache"}
            assert users == {"app"}
            assert admin.execute_command("SELECT", 2)
        with redis.Redis(port=port, password="default-pw", db=2) as db2:
            assert db2.get("k") == b"as app"
    finally:
        await app.close()

    # A refused AUTH is a connection failure: the breaker opens rather than every call
    # paying a connect to be refused again.
    wrong = make_backend(f"redis://app:wrong@127.0.0.1:{port}/0", failure_threshold=1)
    try:
        with pytest.raises(CacheBackendError, match="unavailable"):
            await wrong.get("k")
        assert wrong.breaker.state is BreakerState.OPEN
        with pytest.raises(CacheUnavailable):
            await wrong.get("k")
    finally:
        await wrong.close()


def tls_redis(
    tmp_path: Path, ca: CertificateAuthority, *, client_certs: bool
) -> tuple[RedisProcess, int]:
    """A private redis-server and its TLS port, beside the plain one."""
    server_pair = ca.issue("redis", dns_name="localhost", client=False)
    (tmp_path / "ca.pem").write_bytes(ca.certificate)
    (tmp_path / "redis.pem").write_bytes(server_pair.certificate)
    (tmp_path / "redis.key").write_bytes(server_pair.private_key)
    tls_port = free_port()
    server = RedisProcess(
        *("--tls-port", str(tls_port)),
        *("--tls-cert-file", str(tmp_path / "redis.pem")),
        *("--tls-key-file", str(tmp_path / "redis.key")),
        *("--tls-ca-cert-file", str(tmp_path / "ca.pem")),
        *("--tls-auth-clients", "yes" if client_certs else "no"),
    )
    return server, tls_port


async def test_rediss_url_speaks_verified_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    server, tls_port = tls_redis(tmp_path, ca, client_certs=True)
    server.start()
    url = f"rediss://localhost:{tls_port}/4"
    client_pair = ca.issue("ferrule", dns_name=None, client=True)
    (tmp_path / "client.pem").write_bytes(client_pair.certificate)
    (tmp_path / "client.key").write_bytes(client_pair.private_key)
    try:
        # The system trust store does not know this CA: verification must refuse it.
        untrusted = make_backend(url, timeout_ms=2000)
        try:
            with pytest.raises(CacheBackendError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.get("k")
        finally:
            await untrusted.close()

        # Trusted, but Redis demands a client certificate.
        anonymous = make_backend(
            RedisConnectionConfig(url, tls_ca_file=str(tmp_path / "ca.pem")), timeout_ms=2000
        )
        try:
            with pytest.raises(CacheBackendError, match="unavailable"):
                await anonymous.get("k")
        finally:
            await anonymous.close()

        config = RedisConnectionConfig(
            url,
            tls_ca_file=str(tmp_path / "ca.pem"),
            tls_cert_file=str(tmp_path / "client.pem"),
            tls_key_file=str(tmp_path / "client.key"),
        )
        trusted = make_backend(config, timeout_ms=2000)
        try:
            await store(trusted, "over-tls", b"secret")
            assert await trusted.get("over-tls") == b"secret"
        finally:
            await trusted.close()
        with redis.Redis(port=server.port, db=4) as plain:
            assert plain.get("over-tls") == b"secret"
        await assert_near_cache_serves(config)
    finally:
        server.kill()


async def test_unix_socket_url(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisProcess("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    server.start()
    backend = make_backend(f"unix://{socket_path}?db=6", timeout_ms=2000)
    try:
        await store(backend, "over-unix", b"local")
        assert await backend.get("over-unix") == b"local"
        with redis.Redis(unix_socket_path=str(socket_path), db=6) as direct:
            assert direct.get("over-unix") == b"local"
            assert "ferrule-cache" in {c.get("name") for c in direct.client_list()}
        await assert_near_cache_serves(f"unix://{socket_path}?db=6")
    finally:
        await backend.close()
        server.kill()


# -- error replies and scripts -----------------------------------------------------------


async def test_error_reply_is_a_backend_error_that_keeps_the_breaker_closed(
    redis_url: str, namespace: str
) -> None:
    setup = aioredis.Redis.from_url(redis_url)
    await setup.hset(f"{namespace}:hash", "field", "value")
    await setup.set(f"{namespace}:text", "not a number")
    await setup.set(f"{namespace}:ok", "fine")
    await setup.aclose()
    backend = make_backend(redis_url, timeout_ms=1000, failure_threshold=1)
    try:
        for _ in range(3):
            with pytest.raises(CacheBackendError, match="WRONGTYPE"):
                await backend.get(f"{namespace}:hash")
            with pytest.raises(CacheBackendError, match="not an integer"):
                await backend.bump_counter(f"{namespace}:text", 1)  # fails inside the script
        assert backend.breaker.is_closed
        assert not backend.degraded
        assert await backend.get(f"{namespace}:ok") == b"fine"
    finally:
        await backend.close()


async def test_unreachable_redis_opens_the_breaker() -> None:
    backend = make_backend(f"redis://127.0.0.1:{free_port()}/0", failure_threshold=2)
    try:
        for _ in range(2):
            with pytest.raises(CacheBackendError, match="unavailable"):
                await backend.get("k")
        assert backend.degraded
        with pytest.raises(CacheUnavailable):
            await backend.get("k")
        with pytest.raises(CacheBackendError, match="unavailable"):
            await backend.ping()  # health bypasses the breaker
    finally:
        await backend.close()


async def test_scripts_survive_a_script_flush(own_redis: RedisProcess) -> None:
    """After Redis lost its script cache (restart, SCRIPT FLUSH) scripts still run."""
    backend = make_backend(own_redis.url, timeout_ms=1000)
    try:
        assert await backend.read_counter("counter", 7) == 7
        with redis.Redis(port=own_redis.port) as admin:
            admin.script_flush()
        assert await backend.bump_counter("counter", 7) == 8
        assert await backend.read_counter("counter", 7) == 8
        with redis.Redis(port=own_redis.port) as admin:
            admin.script_flush()
        assert await backend.bump_counter("counter", 7) == 9
        assert backend.breaker.is_closed
    finally:
        await backend.close()


# -- a hung server ------------------------------------------------------------------------


async def test_hung_redis_fails_calls_within_the_timeout_then_recovers(
    own_redis: RedisProcess,
) -> None:
    backend = make_backend(own_redis.url)
    try:
        await store(backend, "k", b"before")
        own_redis.pause()

        async def failing_get(delay: float) -> None:
            await asyncio.sleep(delay)
            with pytest.raises(CacheBackendError, match="unavailable"):
                await backend.get("k")

        # Redis stays paused until every call has failed: a call bounded by how long Redis
        # hangs, not by its timeout, would never return (the deadline only stops a hang).
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*(failing_get(i * 0.002) for i in range(40)))

        own_redis.resume()
        assert await backend.get("k") == b"before"
    finally:
        own_redis.resume()
        await backend.close()


async def test_close_releases_every_connection(own_redis: RedisProcess) -> None:
    backend = RedisBackend(own_redis.url, timeout_ms=1000, prefix="p")
    await asyncio.gather(*(store(backend, f"p:k{i}", b"v") for i in range(20)))
    assert cache_clients(own_redis.port) != []
    await backend.close()
    for _ in range(100):  # Redis notices the closed sockets on its own time
        with redis.Redis(port=own_redis.port) as admin:
            names = {c.get("name") for c in admin.client_list()}
        if not names & {"ferrule-cache", "ferrule-listener"}:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"connections left open: {names}")


# -- many calls and cancellation ----------------------------------------------------------


def value_for(i: int) -> bytes:
    """Values of many sizes, so some replies span several reads of the socket."""
    size = (0, 10, 300, 5_000, 70_000, 300_000)[i % 6]
    return f"value-{i}:".encode() + bytes([i % 251]) * size


async def test_concurrent_calls_each_get_their_own_reply_on_a_bounded_pool(
    own_redis: RedisProcess,
) -> None:
    n_keys = 600
    with redis.Redis(port=own_redis.port) as setup:
        setup.mset({f"k{i}": value_for(i) for i in range(n_keys)})
        setup.mset({f"c{i}": str(1000 + i) for i in range(n_keys)})
    before = connections_received(own_redis.port)
    backend = make_backend(own_redis.url, timeout_ms=10_000, max_connections=8)
    rng = random.Random(7)

    async def check(i: int) -> None:
        if i % 2:
            assert await backend.get(f"k{i}") == value_for(i)
        else:
            assert await backend.read_counter(f"c{i}", 0) == 1000 + i

    try:
        for _ in range(3):
            order = list(range(n_keys))
            rng.shuffle(order)
            await asyncio.gather(*(check(i) for i in order))
        # 1,800 concurrent calls through at most 8 connections (plus this INFO's).
        assert connections_received(own_redis.port) - before <= 8 + 1
    finally:
        await backend.close()


async def test_cancellation_at_random_points_keeps_every_reply_in_step(
    own_redis: RedisProcess,
) -> None:
    """Calls cancelled (or given up on by an outer timeout) at random points, with replies
    of many sizes; every later call must get its own key's reply. (redis-py closes a
    connection whose reply was abandoned, so an abandoned reply cannot reach a later
    command; the connections are reopened.)"""
    n_keys = 60
    with redis.Redis(port=own_redis.port) as setup:
        setup.mset({f"k{i}": value_for(i) for i in range(n_keys)})
        setup.mset({f"c{i}": str(1000 + i) for i in range(n_keys)})
    backend = make_backend(own_redis.url, timeout_ms=10_000)
    rng = random.Random(4321)

    async def op(i: int, kind: int) -> None:
        if kind == 0:
            assert await backend.get(f"k{i}") == value_for(i)
        elif kind == 1:
            assert await backend.read_counter(f"c{i}", 0) == 1000 + i
        else:  # a claim on a filled key: its value, and no lease taken
            claimed = await backend.claim(f"k{i}", f"lease:k{i}", "token", 5_000)
            assert claimed == (value_for(i), False)

    try:
        cancelled = completed = 0
        # How many calls a cancel catches mid-flight depends on how busy the machine is, so
        # rounds continue (boundedly) until enough of both kinds have happened.
        for _round in range(200):
            if _round >= 20 and cancelled >= 400 and completed >= 100:
                break
            tasks = [
                asyncio.create_task(op(rng.randrange(n_keys), rng.randrange(3))) for _ in range(60)
            ]
            for task in tasks:
                if rng.random() < 0.2:
                    continue  # left to finish
                for _ in range(rng.randrange(4)):
                    await asyncio.sleep(0)  # let some calls get further than others
                task.cancel()
            outer = [
                asyncio.create_task(
                    asyncio.wait_for(op(rng.randrange(n_keys), 0), rng.uniform(0, 0.002))
                )
                for _ in range(20)
            ]
            results = await asyncio.gather(*tasks, *outer, return_exceptions=True)
            failures = [
                r for r in results if not isinstance(r, asyncio.CancelledError | TimeoutError)
            ]
            failures = [r for r in failures if r is not None]
            assert not failures, failures
            cancelled += sum(isinstance(r, asyncio.CancelledError | TimeoutError) for r in results)
            completed += sum(r is None for r in results)
        assert cancelled >= 400, cancelled
        assert completed >= 100, completed
        for _ in range(2):
            await asyncio.gather(*(op(i, kind) for i in range(n_keys) for kind in range(3)))
        assert backend.breaker.is_closed
        assert len(cache_clients(own_redis.port)) <= 64  # nothing leaked past the bound
    finally:
        await backend.close()
