"""The one settings object: every knob of the server process, read from the environment.

pydantic-settings does the parsing so that a bad value fails at start with the variable's
name and the reason, instead of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    Field,
    Secret,
    SecretBytes,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from db.cache.redis_client import RedisConnectionConfig, parse_sentinels
from db.engine import DatabaseConfig
from db.point_reads import ROLE_NAME
from server.retention import RetentionPolicy

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./ferrule.db"
DATABASE_URL_SCHEMES = (
    "postgresql+asyncpg://",
    "mariadb+asyncmy://",
    "mysql+asyncmy://",
    "sqlite+aiosqlite://",
)


def _supported_database_url(value: str) -> str:
    if not value.startswith(DATABASE_URL_SCHEMES):
        raise ValueError(
            "must start with " + ", ".join(DATABASE_URL_SCHEMES) + " "
            f"(got {value.split('://', 1)[0]!r})"
        )
    return value


def _backend_of(url: str) -> str:
    """The backend a supported URL names (MariaDB and MySQL are one)."""
    dialect = url.split("+", 1)[0]
    return {"postgresql": "PostgreSQL", "mariadb": "MariaDB/MySQL", "mysql": "MariaDB/MySQL"}.get(
        dialect, "SQLite"
    )


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.1``, ``[::1]``)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


# What a setting is, for the code that must treat every setting of a kind alike (development
# mode ends on any credential, any non-loopback listener, any other service): a kind read
# from the model rather than a list kept by hand, so a setting added later is not missed.
# Credentials are known by type (a secret type, or a file); the two kinds below by marker.


@dataclass(frozen=True)
class Listener:
    """Marks an address this server listens on: ``host:port``, or a host alone when the
    port is a setting of its own."""

    with_port: bool

    def host(self, value: str) -> str:
        return value.rpartition(":")[0] if self.with_port else value


@dataclass(frozen=True)
class Upstream:
    """Marks where another service is (a URL, which may carry its password, or host:port)."""


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


ListenAddress = Annotated[str, AfterValidator(_check_host_port), Listener(with_port=True)]
ListenHost = Annotated[str, Listener(with_port=False)]
UpstreamLocation = Annotated[str, Upstream()]
#: A database URL of a supported backend (the primary's and every replica's).
DatabaseURL = Annotated[UpstreamLocation, AfterValidator(_supported_database_url)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- network ---------------------------------------------------------------
    ferrule_listen: ListenAddress = Field(
        "127.0.0.1:50051", description="host:port the server binds"
    )
    ferrule_health_listen: ListenAddress | None = Field(
        None,
        description="host:port of a second, plaintext listener serving only grpc.health.v1 "
        "(Kubernetes' gRPC probes cannot speak TLS)",
    )
    ferrule_workers: int = Field(1, ge=1, le=64, description="server processes on one port")
    ferrule_grace_seconds: float = Field(10.0, ge=0, description="SIGTERM drain period")
    ferrule_event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="the server's event loop implementation"
    )
    ferrule_gc_gen0_threshold: int = Field(
        50_000, ge=1, description="allocations between young-generation collections"
    )
    ferrule_max_concurrent_rpcs: int = Field(
        512, ge=1, description="authenticated RPCs in flight; beyond it RESOURCE_EXHAUSTED"
    )
    ferrule_max_watches: int = Field(
        256, ge=1, description="open watch streams per process; beyond it RESOURCE_EXHAUSTED"
    )
    ferrule_max_watches_per_caller: int = Field(
        64, ge=1, description="open watch streams per token subject and organization"
    )
    ferrule_watch_backlog_rows: int = Field(
        1000,
        ge=1,
        description="WatchPredictions: rows read but not yet sent per stream; beyond it the "
        "stream ends with RESOURCE_EXHAUSTED and the cursor to resume from",
    )
    ferrule_max_anonymous_streams: int = Field(
        16,
        ge=1,
        description="health Watch and reflection streams in flight (callers need no token)",
    )
    ferrule_max_streams_per_connection: int = Field(
        100, ge=1, description="HTTP/2 concurrent streams one connection may open"
    )
    ferrule_keepalive_seconds: float = Field(
        60.0, gt=0, description="ping a connection idle this long (finds dead peers)"
    )
    ferrule_keepalive_timeout_seconds: float = Field(
        20.0, gt=0, description="close a connection whose ping is unanswered this long"
    )
    ferrule_min_client_ping_seconds: float = Field(
        10.0, gt=0, description="clients pinging more often than this are disconnected"
    )
    ferrule_max_connection_age_seconds: float = Field(
        1800.0,
        ge=0,
        description="send GOAWAY after this long so clients reconnect and rebalance (0: never)",
    )
    ferrule_max_connection_age_grace_seconds: float = Field(
        300.0, ge=0, description="calls in flight at GOAWAY get this long to finish"
    )
    ferrule_reflection: bool = Field(True, description="serve gRPC server reflection")
    ferrule_allow_insecure: bool = Field(
        False, description="allow plaintext on a non-loopback FERRULE_LISTEN address"
    )
    ferrule_max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    ferrule_tls_cert_file: Path | None = None
    ferrule_tls_key_file: Path | None = None
    ferrule_tls_client_ca_file: Path | None = Field(
        None, description="when set, clients must present a certificate signed by this CA"
    )

    # --- database --------------------------------------------------------------
    database_url: DatabaseURL = DEFAULT_DATABASE_URL
    database_replica_urls: Annotated[list[DatabaseURL], NoDecode] = Field(default_factory=list)
    database_pool_size: int = Field(10, ge=1)
    database_point_read_pool_size: int = Field(
        4, ge=0, description="connections kept for single-row reads (0: off; unused via PgBouncer)"
    )
    database_max_overflow: int = Field(10, ge=0)
    database_pool_timeout: float = Field(5.0, gt=0)
    database_pool_recycle: float = Field(1800.0, gt=0)
    database_pool_pre_ping: bool = True
    database_pool_ping_idle_seconds: float = Field(
        2.0, ge=0, description="pre-ping only connections idle at least this long"
    )
    database_statement_cache_size: int = Field(
        100, ge=0, description="0 disables prepared statements (PgBouncer transaction mode)"
    )
    database_app_role: str | None = Field(
        None,
        pattern=ROLE_NAME.pattern,
        description="PostgreSQL role each transaction switches to (subject to RLS)",
    )
    ferrule_migrate_on_start: bool = False
    ferrule_default_statement_timeout_ms: int = Field(
        30_000, ge=1, description="statement_timeout when the RPC has no deadline"
    )

    # --- cache -----------------------------------------------------------------
    redis_url: UpstreamLocation | None = Field(
        None, description="redis://, rediss:// (TLS) or unix://; unset: an in-process cache"
    )
    ferrule_redis_tls_ca_file: Path | None = Field(
        None, description="rediss://: CA bundle that signs Redis's certificate"
    )
    ferrule_redis_tls_cert_file: Path | None = Field(
        None, description="rediss://: client certificate presented to Redis"
    )
    ferrule_redis_tls_key_file: Path | None = None
    ferrule_redis_sentinels: Annotated[list[UpstreamLocation], NoDecode] = Field(
        default_factory=list, description="host:port of Redis Sentinels (comma-separated)"
    )
    ferrule_redis_sentinel_service: str | None = Field(
        None, description="the master's name in Sentinel"
    )
    ferrule_redis_sentinel_password: SecretStr | None = None
    ferrule_near_cache_enabled: bool = Field(
        True, description="keep Redis reads in process memory, invalidated by Redis"
    )
    ferrule_near_cache_max_entries: int = Field(10_000, ge=1)
    ferrule_near_cache_ttl_seconds: float = Field(
        60.0, gt=0, description="longest a near-cache entry lives (backstop)"
    )
    ferrule_cache_ttl_seconds: float = Field(300.0, gt=0)
    ferrule_cache_stats_ttl_seconds: float = Field(30.0, gt=0)
    ferrule_cache_timeout_ms: int = Field(50, ge=1)
    ferrule_cache_invalidation_retry_ms: int = Field(
        1_000, ge=0, description="how long a write retries a failed invalidation before answering"
    )
    ferrule_cache_local_max_entries: int = Field(10_000, ge=1)
    ferrule_cache_enabled: bool = Field(
        True, description="false: every read goes to the database (benchmarks, debugging)"
    )
    ferrule_cache_prefix: str = Field(
        "ferrule", pattern=r"^[A-Za-z0-9_.-]+$", description="namespace of every Redis key"
    )

    # --- security --------------------------------------------------------------
    ferrule_jwt_secret: SecretStr | None = None
    ferrule_jwt_public_key_file: Path | None = None
    ferrule_jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["HS256", "RS256", "ES256"]
    )
    ferrule_jwt_audience: str | None = None
    ferrule_jwt_issuer: str | None = None
    ferrule_admin_token: SecretStr | None = None
    ferrule_page_token_secret: SecretStr | None = Field(
        None, description="HMAC key for page tokens; defaults to one derived from the JWT secret"
    )
    ferrule_page_token_previous_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="earlier page token keys, still accepted (comma-separated) after a rotation",
    )

    ferrule_search_config: str = Field(
        "english",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description=(
            "PostgreSQL text search configuration of SearchAnalyses; the migration builds "
            "the search column with it, so set it alike for both (docs/search.md)"
        ),
    )

    # --- retention (server/retention.py) ------------------------------------------
    ferrule_retention_interval_seconds: float = Field(600.0, gt=0)
    ferrule_request_log_retention_days: float = Field(30.0, gt=0)
    ferrule_idempotency_retention_hours: float = Field(
        24.0, gt=0, description="how long a request_id replays its first result"
    )
    ferrule_ingest_batch_retention_days: float = Field(7.0, gt=0)
    ferrule_session_retention_days: float = Field(
        7.0, gt=0, description="expired or revoked sessions are kept this long"
    )

    # --- observability ---------------------------------------------------------
    ferrule_slow_query_ms: float = Field(200.0, ge=0)
    ferrule_trace_sql_params: bool = False
    ferrule_explain_slow_queries: bool = False
    ferrule_metrics_port: int | None = Field(None, ge=0, le=65535)
    ferrule_metrics_host: ListenHost = Field(
        "127.0.0.1", description="address of the Prometheus endpoint (0.0.0.0 to scrape remotely)"
    )
    ferrule_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ferrule_request_log: bool = True
    ferrule_health_probe_seconds: float = Field(2.0, gt=0)

    @field_validator(
        "database_replica_urls",
        "ferrule_jwt_algorithms",
        "ferrule_redis_sentinels",
        "ferrule_page_token_previous_secrets",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_replicas_match_the_primary(self) -> Settings:
        # A replica is the primary's database under another address: the same backend.
        primary = _backend_of(self.database_url)
        for url in self.database_replica_urls:
            if primary == "SQLite":
                raise ValueError("DATABASE_REPLICA_URLS: the embedded SQLite has no replicas")
            if _backend_of(url) != primary:
                raise ValueError(
                    f"DATABASE_REPLICA_URLS: replicas of a {primary} primary are {primary} too"
                    f" (got {url.split('://', 1)[0]!r})"
                )
        return self

    @model_validator(mode="after")
    def _check_workers_share_a_cache(self) -> Settings:
        # Each process's in-process cache would miss the others' invalidations.
        if self.ferrule_workers > 1 and self.redis is None:
            raise ValueError("FERRULE_WORKERS > 1 needs REDIS_URL (a cache the workers share)")
        return self

    @model_validator(mode="after")
    def _check_redis(self) -> Settings:
        try:
            _ = self.redis
        except ValueError as exc:
            raise ValueError(f"REDIS_URL / FERRULE_REDIS_*: {exc}") from None
        return self

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        if (self.ferrule_tls_cert_file is None) != (self.ferrule_tls_key_file is None):
            raise ValueError("FERRULE_TLS_CERT_FILE and FERRULE_TLS_KEY_FILE go together")
        if self.ferrule_tls_client_ca_file is not None and self.ferrule_tls_cert_file is None:
            raise ValueError("mutual TLS (FERRULE_TLS_CLIENT_CA_FILE) needs server TLS too")
        return self

    def plaintext_refusal(self) -> str | None:
        """Why serving with these settings is refused, or None. Tokens, passwords and
        session tokens travel in the requests: in plaintext they may only cross loopback,
        unless the operator says the network is protected (a mesh terminating mTLS, say).
        Checked when serving starts, not here: `migrate` and `token` listen on nothing."""
        host = self.ferrule_listen.rpartition(":")[0]
        if self.tls_enabled or self.ferrule_allow_insecure or is_loopback(host):
            return None
        return (
            f"FERRULE_LISTEN={self.ferrule_listen} is not a loopback address and TLS is off: "
            "set FERRULE_TLS_CERT_FILE and FERRULE_TLS_KEY_FILE, or FERRULE_ALLOW_INSECURE=true "
            "when something else protects the network"
        )

    @property
    def page_token_previous_secrets(self) -> tuple[bytes, ...]:
        previous = self.ferrule_page_token_previous_secrets
        return tuple(secret.get_secret_value().encode() for secret in previous)

    @cached_property
    def database(self) -> DatabaseConfig:
        return DatabaseConfig(
            url=self.database_url,
            replica_urls=tuple(self.database_replica_urls),
            pool_size=self.database_pool_size,
            point_read_pool_size=self.database_point_read_pool_size,
            max_overflow=self.database_max_overflow,
            pool_timeout=self.database_pool_timeout,
            pool_recycle=self.database_pool_recycle,
            pool_pre_ping=self.database_pool_pre_ping,
            pool_ping_idle_seconds=self.database_pool_ping_idle_seconds,
            statement_cache_size=self.database_statement_cache_size,
            app_role=self.database_app_role,
        )

    @cached_property
    def redis(self) -> RedisConnectionConfig | None:
        """Where the shared cache lives; None for the in-process cache."""
        if self.redis_url is None and not self.ferrule_redis_sentinels:
            return None
        password = self.ferrule_redis_sentinel_password
        return RedisConnectionConfig(
            url=self.redis_url,
            tls_ca_file=_path(self.ferrule_redis_tls_ca_file),
            tls_cert_file=_path(self.ferrule_redis_tls_cert_file),
            tls_key_file=_path(self.ferrule_redis_tls_key_file),
            sentinels=parse_sentinels(self.ferrule_redis_sentinels),
            sentinel_service=self.ferrule_redis_sentinel_service,
            sentinel_password=password.get_secret_value() if password else None,
        )

    @property
    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(
            request_log=timedelta(days=self.ferrule_request_log_retention_days),
            idempotency_keys=timedelta(hours=self.ferrule_idempotency_retention_hours),
            ingest_batches=timedelta(days=self.ferrule_ingest_batch_retention_days),
            inactive_sessions=timedelta(days=self.ferrule_session_retention_days),
        )

    @property
    def tls_enabled(self) -> bool:
        return self.ferrule_tls_cert_file is not None


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def _parts(annotation: Any) -> Iterator[Any]:
    """Every type and Annotated marker inside `annotation` (``list[X] | None`` yields X)."""
    yield annotation
    origin = get_origin(annotation)
    if origin is not None:
        yield origin
    args = get_args(annotation)
    if origin is Annotated:
        yield from _parts(args[0])
        yield from args[1:]
    else:
        for arg in args:
            yield from _parts(arg)


def _field_parts(name: str) -> list[Any]:
    field = Settings.model_fields[name]
    return [*field.metadata, *_parts(field.annotation)]


def credential_settings() -> tuple[str, ...]:
    """Settings holding a credential: those typed as a secret, and those naming a file (every
    file setting is a key or a certificate; a file added for something else would count too,
    the cautious side)."""
    kinds = (SecretStr, SecretBytes, Secret, Path)
    return tuple(
        name
        for name in Settings.model_fields
        if any(isinstance(p, type) and issubclass(p, kinds) for p in _field_parts(name))
    )


def listener_settings() -> dict[str, Listener]:
    """Settings holding an address this server listens on, with how to read its host."""
    return {
        name: marker
        for name in Settings.model_fields
        for marker in _field_parts(name)
        if isinstance(marker, Listener)
    }


def upstream_settings() -> tuple[str, ...]:
    """Settings saying where another service (a database, Redis) is."""
    return tuple(
        name
        for name in Settings.model_fields
        if any(isinstance(p, Upstream) for p in _field_parts(name))
    )
