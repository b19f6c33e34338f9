"""The hand-written Redis client (db/cache/redis_connection.py) under RedisBackend, against
real Redis servers only: URLs (AUTH, SELECT, TLS), error replies, a hung server, many
commands multiplexed on one connection, and cancellation at random points.

Tests that restart, pause, reconfigure or count connections on a server run their own
redis-server; the rest use the shared one under a private key prefix.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from db.cache import BreakerState, CacheBackendError, CacheUnavailable, CircuitBreaker
from db.cache.redis_backend import RedisBackend
from db.cache.redis_connection import RedisConnection, RedisConnectionError, RedisTimeoutError
from tests.db.cache_fixtures import RedisProcess, free_port

TIMEOUT_MS = 100


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    yield server
    server.kill()


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
    url: str, *, timeout_ms: int = TIMEOUT_MS, failure_threshold: int = 1000
) -> RedisBackend:
    """A backend whose breaker, by default, never opens (so every call reaches Redis)."""
    breaker = CircuitBreaker(failure_threshold=failure_threshold, cooldown_s=60)
    return RedisBackend(url, timeout_ms=timeout_ms, breaker=breaker)


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


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "unix:///tmp/redis.sock",
        "http://127.0.0.1:6379",
        "redis://",
        "redis://127.0.0.1:6379/zero",
        "redis://127.0.0.1:6379/0/1",
        "redis://127.0.0.1:6379/0?ssl_cert_reqs=none",
        "redis://127.0.0.1:port/0",
        "redis://user@127.0.0.1:6379/0",
    ],
)
def test_unsupported_urls_fail_at_construction(url: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each URL has its own message
        RedisConnection(url, timeout=1)


def test_construction_needs_no_event_loop_and_connects_nothing() -> None:
    # Sync test, no running loop: built before the loop runs (or before a fork).
    connection = RedisConnection("redis://127.0.0.1:1/5", timeout=1)
    assert connection.db == 5
    assert connection.pending == 0
    assert RedisConnection("redis://127.0.0.1", timeout=1).db == 0


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

    app = RedisConnection(f"redis://app:p%40ss%3Aw%2Frd@127.0.0.1:{port}/2", timeout=1)
    default = RedisConnection(f"redis://:default-pw@127.0.0.1:{port}", timeout=1)
    try:
        assert await app.execute("ACL", "WHOAMI") == b"app"
        info = await app.execute("CLIENT", "INFO")
        assert isinstance(info, bytes)
        assert b" db=2 " in info
        assert await default.execute("ACL", "WHOAMI") == b"default"
    finally:
        await app.close()
        await default.close()

    # A refused AUTH is a connection failure: the breaker opens rather than every call
    # paying a connect to be refused again.
    wrong = make_backend(f"redis://app:wrong@127.0.0.1:{port}/0", failure_threshold=1)
    try:
        with pytest.raises(CacheBackendError, match="refused AUTH"):
            await wrong.get("k")
        assert wrong.breaker.state is BreakerState.OPEN
        with pytest.raises(CacheUnavailable):
            await wrong.get("k")
    finally:
        await wrong.close()


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca, cert, key) paths."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferrule test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_rediss_url_speaks_verified_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = write_tls_files(tmp_path)
    tls_port = free_port()
    server = RedisProcess(
        *("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"),
    )
    server.start()
    url = f"rediss://127.0.0.1:{tls_port}/4"
    try:
        # The system trust store does not know this CA: verification must refuse it.
        untrusted = make_backend(url, timeout_ms=2000)
        try:
            with pytest.raises(CacheBackendError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.get("k")
        finally:
            await untrusted.close()

        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # read when the context is created
        trusted = make_backend(url, timeout_ms=2000)
        try:
            await store(trusted, "over-tls", b"secret")
            assert await trusted.get("over-tls") == b"secret"
        finally:
            await trusted.close()
        with redis.Redis(port=server.port, db=4) as plain:
            assert plain.get("over-tls") == b"secret"
    finally:
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
        assert await backend.get(f"{namespace}:ok") == b"fine"  # the connection is in step
    finally:
        await backend.close()


async def test_unreachable_redis_opens_the_breaker() -> None:
    backend = make_backend(f"redis://127.0.0.1:{free_port()}/0", failure_threshold=2)
    try:
        for _ in range(2):
            with pytest.raises(CacheBackendError, match="cannot connect"):
                await backend.get("k")
        assert backend.degraded
        with pytest.raises(CacheUnavailable):
            await backend.get("k")
        with pytest.raises(CacheBackendError, match="cannot connect"):
            await backend.ping()  # health bypasses the breaker
    finally:
        await backend.close()


async def test_scripts_survive_a_script_flush(own_redis: RedisProcess) -> None:
    """EVALSHA gets NOSCRIPT after Redis lost its script cache; EVAL runs and reloads it."""
    backend = make_backend(own_redis.url, timeout_ms=1000)

    def noscripts() -> int:
        with redis.Redis(port=own_redis.port) as admin:
            stats = admin.info("errorstats").get("errorstat_NOSCRIPT", {"count": 0})
        return int(stats["count"])

    try:
        # Each script's first use (after start or a flush) costs one NOSCRIPT; later
        # uses are plain EVALSHAs.
        assert await backend.read_counter("counter", 7) == 7
        assert await backend.read_counter("counter", 7) == 7
        assert noscripts() == 1
        with redis.Redis(port=own_redis.port) as admin:
            admin.script_flush()
        assert await backend.bump_counter("counter", 7) == 8
        assert await backend.read_counter("counter", 7) == 8
        assert await backend.read_counter("counter", 7) == 8
        assert await backend.bump_counter("counter", 7) == 9
        assert noscripts() == 3
    finally:
        await backend.close()


# -- a hung server ------------------------------------------------------------------------


async def test_hung_redis_fails_pending_calls_within_the_timeout_then_recovers(
    own_redis: RedisProcess,
) -> None:
    backend = make_backend(own_redis.url)
    timeout = TIMEOUT_MS / 1000
    try:
        await store(backend, "k", b"before")
        own_redis.pause()

        async def timed_get(delay: float) -> float:
            await asyncio.sleep(delay)
            started = time.monotonic()
            with pytest.raises(CacheBackendError, match="unavailable"):
                await backend.get("k")
            return time.monotonic() - started

        started = time.monotonic()
        # Staggered over 80 ms, all before the first call's timeout.
        durations = await asyncio.gather(*(timed_get(i * 0.002) for i in range(40)))
        assert max(durations) < timeout + 0.05, durations
        # The first timeout aborted the connection, failing the calls queued behind it
        # early instead of each waiting out its own timeout.
        assert time.monotonic() - started < timeout + 0.1
        assert min(durations) < timeout / 2, sorted(durations)[:5]

        own_redis.resume()
        assert await backend.get("k") == b"before"
    finally:
        own_redis.resume()
        await backend.close()


async def test_a_timeout_drops_the_pending_replies_and_the_next_call_reconnects(
    own_redis: RedisProcess,
) -> None:
    connection = RedisConnection(own_redis.url, timeout=TIMEOUT_MS / 1000)
    try:
        assert await connection.execute("PING") == b"PONG"
        own_redis.pause()
        results = await asyncio.gather(
            *(connection.execute("GET", f"k{i}") for i in range(200)), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in results), results[:3]
        assert any(isinstance(r, RedisTimeoutError) for r in results)
        assert connection.pending == 0  # nothing left waiting on the dead connection
        own_redis.resume()
        before = connections_received(own_redis.port)
        assert await connection.execute("PING") == b"PONG"
        assert connections_received(own_redis.port) == before + 2  # ours, and the INFO
    finally:
        own_redis.resume()
        await connection.close()


async def test_pending_replies_are_bounded(own_redis: RedisProcess) -> None:
    connection = RedisConnection(own_redis.url, timeout=5, max_pending=5)
    try:
        assert await connection.execute("PING") == b"PONG"
        own_redis.pause()
        waiting = [asyncio.create_task(connection.execute("GET", f"k{i}")) for i in range(5)]
        await asyncio.sleep(0.05)
        assert connection.pending == 5
        with pytest.raises(RedisConnectionError, match="5 replies pending"):
            await connection.execute("GET", "one too many")
        own_redis.resume()
        assert await asyncio.gather(*waiting) == [None] * 5
        assert connection.pending == 0
    finally:
        own_redis.resume()
        await connection.close()


async def test_close_fails_pending_and_later_commands(redis_url: str, namespace: str) -> None:
    connection = RedisConnection(redis_url, timeout=5)
    blocked = asyncio.create_task(connection.execute("BLPOP", f"{namespace}:never", 3))
    await asyncio.sleep(0.05)
    assert connection.pending == 1
    started = time.monotonic()
    await connection.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await blocked
    assert time.monotonic() - started < 1
    with pytest.raises(RedisConnectionError, match="closed"):
        await connection.execute("PING")


# -- multiplexing and cancellation --------------------------------------------------------


def value_for(i: int) -> bytes:
    """Values of many sizes, so some replies span several reads of the socket."""
    size = (0, 10, 300, 5_000, 70_000, 300_000)[i % 6]
    return f"value-{i}:".encode() + bytes([i % 251]) * size


async def test_concurrent_calls_on_one_connection_each_get_their_own_reply(
    own_redis: RedisProcess,
) -> None:
    n_keys = 600
    with redis.Redis(port=own_redis.port) as setup:
        setup.mset({f"k{i}": value_for(i) for i in range(n_keys)})
        setup.mset({f"c{i}": str(1000 + i) for i in range(n_keys)})
    before = connections_received(own_redis.port)
    backend = make_backend(own_redis.url, timeout_ms=10_000)
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
        # 1,800 concurrent calls, the first 600 of them racing to connect: one connection.
        assert connections_received(own_redis.port) == before + 2  # ours, and this INFO
    finally:
        await backend.close()


async def test_cancellation_at_random_points_keeps_every_reply_in_step(
    own_redis: RedisProcess,
) -> None:
    """Calls cancelled (or given up on by an outer timeout) at random points, with replies
    of many sizes; every later call must get its own key's reply, and cancellation must
    never have cost the connection (no reconnects: safety comes from the FIFO, not from
    dropping the connection as redis-py does)."""
    n_keys = 60
    with redis.Redis(port=own_redis.port) as setup:
        setup.mset({f"k{i}": value_for(i) for i in range(n_keys)})
        setup.mset({f"c{i}": str(1000 + i) for i in range(n_keys)})
    before = connections_received(own_redis.port)
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
        for _round in range(20):
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
        assert connections_received(own_redis.port) == before + 2  # ours, and this INFO
    finally:
        await backend.close()
