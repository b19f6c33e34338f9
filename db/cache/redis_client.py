"""Where Redis is and how to reach it: redis-py connection pools from Ferrule's settings.

One URL names a standalone Redis: ``redis://`` (TCP), ``rediss://`` (TLS, verified
against ``tls_ca_file`` or the system trust store, with an optional client certificate)
or ``unix://`` (a socket path). With ``sentinels`` set, Redis Sentinel names the master
of ``sentinel_service`` instead; the URL, if any, then only gives the credentials, the
database and whether to speak TLS (its host is not used).

Every connection speaks RESP2: the cache needs nothing from RESP3, and the invalidation
listener must be RESP2 (redis-py does not hand RESP3 push frames to a reader).
No retries (a retry would multiply the per-call timeout, and the caller has a database
to fall back on) and no health-check pings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class RedisConnectionConfig:
    """``url`` may be None only with ``sentinels``; ``sentinels`` are ``(host, port)``."""

    url: str | None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str | None = None
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        if self.url is None and not self.sentinels:
            raise ValueError("a Redis URL or Sentinel addresses are needed")
        if self.url is not None:
            parse_url(self.url)  # ValueError now, not at the first call
            parts = urlsplit(self.url)
            database = parts.path.strip("/")
            if parts.scheme.lower() != "unix" and database and not database.isdigit():
                # redis-py would silently use database 0.
                raise ValueError(f"the Redis URL path must be a database number: {database!r}")
        if self.sentinels and not self.sentinel_service:
            raise ValueError("Sentinel needs the service (master) name")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("the Redis client certificate and key go together")

    @property
    def tls(self) -> bool:
        return self.url is not None and self.url.lower().startswith("rediss://")

    def describe(self) -> str:
        """For logs and errors: where, never the credentials."""
        if self.sentinels:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel {self.sentinel_service} via {hosts}"
        kwargs = parse_url(self.url or "")
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def parse_sentinels(addresses: list[str]) -> tuple[tuple[str, int], ...]:
    """``host[:port]`` strings (the default Sentinel port is 26379)."""
    out: list[tuple[str, int]] = []
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep:
            host, port = address, str(DEFAULT_SENTINEL_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port for a Sentinel, got {address!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def _connection_kwargs(config: RedisConnectionConfig, timeout_s: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(parse_url(config.url)) if config.url else {}
    kwargs.update(
        protocol=2,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    if config.tls:
        if config.tls_ca_file:
            kwargs["ssl_ca_certs"] = config.tls_ca_file
        if config.tls_cert_file:
            kwargs["ssl_certfile"] = config.tls_cert_file
            kwargs["ssl_keyfile"] = config.tls_key_file
    return kwargs


def connection_pool(
    config: RedisConnectionConfig, *, timeout_s: float, client_name: str
) -> ConnectionPool:
    """A pool of connections to the (current) master; nothing connects until used."""
    kwargs = _connection_kwargs(config, timeout_s)
    kwargs["client_name"] = client_name
    if not config.sentinels:
        return ConnectionPool(**kwargs)
    assert config.sentinel_service is not None
    for where in ("host", "port", "path"):
        kwargs.pop(where, None)
    tls = kwargs.pop("connection_class", None) is SSLConnection
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "protocol": 2,
    }
    if config.sentinel_password:
        sentinel_kwargs["password"] = config.sentinel_password
    manager = Sentinel(list(config.sentinels), sentinel_kwargs=sentinel_kwargs)
    # redis-py does not annotate this constructor; the variable gives it a type.
    sentinel_pool: Callable[..., ConnectionPool] = SentinelConnectionPool
    return sentinel_pool(config.sentinel_service, manager, ssl=tls, **kwargs)
