"""Assembles one server process: database, interceptors, services, health, reflection.

`FerruleApp` is what both `python -m server` and the test fixtures start, so the tests
exercise exactly the stack that production runs.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from db import search_sql
from db.cache import create_cache
from db.change_feed import create_change_feed
from db.engine import Database
from db.errors import DomainError
from db.observability import install_statement_observers
from db.repositories.request_log import LoggedCall, insert_request_log
from server.auth import Authenticator
from server.dependencies import Dependencies
from server.generic_handlers import GenericHandlersOnly
from server.health import HealthProbe
from server.interceptors.auth import AuthInterceptor
from server.interceptors.call_context import CallContextInterceptor
from server.interceptors.capacity import CapacityInterceptor
from server.interceptors.chain import InterceptorChain
from server.interceptors.errors import ErrorMappingInterceptor
from server.interceptors.malformed import MalformedRequestInterceptor
from server.interceptors.tracing import TracingInterceptor
from server.page_tokens import PageTokenCodec
from server.reflection import enable_reflection
from server.request_log import RequestLogInterceptor, RequestLogWriter
from server.retention import RetentionJob
from server.services import register_services
from server.settings import Settings
from server.telemetry import Telemetry, setup_telemetry
from server.watch_slots import WatchSlots

log = logging.getLogger("ferrule.app")


def page_token_secret(settings: Settings) -> bytes:
    """Explicit secret if configured, else one derived from the other server secrets."""
    if settings.ferrule_page_token_secret is not None:
        return settings.ferrule_page_token_secret.get_secret_value().encode()
    material = "|".join(
        s.get_secret_value()
        for s in (settings.ferrule_jwt_secret, settings.ferrule_admin_token)
        if s is not None
    )
    if not material:
        raise ValueError(
            "set FERRULE_PAGE_TOKEN_SECRET (or FERRULE_JWT_SECRET / FERRULE_ADMIN_TOKEN)"
        )
    return hashlib.sha256(b"ferrule-page-token|" + material.encode()).digest()


def page_token_codec(settings: Settings) -> PageTokenCodec:
    previous = settings.page_token_previous_secrets
    return PageTokenCodec(page_token_secret(settings), previous=previous)


def build_authenticator(settings: Settings) -> Authenticator:
    public_key = None
    if settings.ferrule_jwt_public_key_file is not None:
        public_key = Path(settings.ferrule_jwt_public_key_file).read_text()
    return Authenticator(
        jwt_secret=(
            settings.ferrule_jwt_secret.get_secret_value() if settings.ferrule_jwt_secret else None
        ),
        jwt_public_key=public_key,
        algorithms=settings.ferrule_jwt_algorithms,
        admin_token=(
            settings.ferrule_admin_token.get_secret_value()
            if settings.ferrule_admin_token
            else None
        ),
        audience=settings.ferrule_jwt_audience,
        issuer=settings.ferrule_jwt_issuer,
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.ferrule_tls_cert_file is None or settings.ferrule_tls_key_file is None:
        return None
    key = Path(settings.ferrule_tls_key_file).read_bytes()
    cert = Path(settings.ferrule_tls_cert_file).read_bytes()
    client_ca = (
        Path(settings.ferrule_tls_client_ca_file).read_bytes()
        if settings.ferrule_tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class InsecureListenError(Exception):
    """Plaintext on a non-loopback address without FERRULE_ALLOW_INSECURE."""


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the server: message limits, per-connection streams,
    keepalive, and a connection age after which clients reconnect (and so rebalance
    across replicas that were added since they connected)."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.ferrule_max_message_bytes),
        ("grpc.max_send_message_length", settings.ferrule_max_message_bytes),
        ("grpc.max_concurrent_streams", settings.ferrule_max_streams_per_connection),
        ("grpc.keepalive_time_ms", ms(settings.ferrule_keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", ms(settings.ferrule_keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            ms(settings.ferrule_min_client_ping_seconds),
        ),
    ]
    if settings.ferrule_max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", ms(settings.ferrule_max_connection_age_seconds)),
            (
                "grpc.max_connection_age_grace_ms",
                ms(settings.ferrule_max_connection_age_grace_seconds),
            ),
        ]
    return options


class FerruleApp:
    def __init__(self, settings: Settings, *, telemetry: Telemetry | None = None) -> None:
        """`telemetry` defaults to what the OTEL_* environment configures (tests pass theirs)."""
        self.settings = settings
        self.database = Database(settings.database)
        # A rollback or close that outlasts the grace period drops its connection instead.
        self.database.cleanup_timeout = settings.ferrule_grace_seconds
        # Per process (after any fork): the OTLP gRPC exporter owns threads of its own.
        self.telemetry = telemetry or setup_telemetry(
            metrics_port=settings.ferrule_metrics_port,
            metrics_host=settings.ferrule_metrics_host,
        )
        self.query_observers = install_statement_observers(
            self.database.engine,
            slow_query_ms=settings.ferrule_slow_query_ms,
            trace_params=settings.ferrule_trace_sql_params,
            explain_slow=settings.ferrule_explain_slow_queries,
            tracer_provider=self.telemetry.tracer_provider,
            meter_provider=self.telemetry.meter_provider,
        )
        for engine in self.database.engines[1:]:
            self.query_observers.attach(engine)
        self.telemetry.metrics.observe_pool(self.database.pool_statuses)
        # Redis when REDIS_URL is set, else a bounded in-process LRU with the same semantics.
        self.cache = create_cache(
            settings.redis,
            prefix=settings.ferrule_cache_prefix,
            timeout_ms=settings.ferrule_cache_timeout_ms,
            local_max_entries=settings.ferrule_cache_local_max_entries,
            near_cache=settings.ferrule_near_cache_enabled,
            near_max_entries=settings.ferrule_near_cache_max_entries,
            near_ttl_s=settings.ferrule_near_cache_ttl_seconds,
            invalidation_retry_ms=settings.ferrule_cache_invalidation_retry_ms,
            tracer_provider=self.telemetry.tracer_provider,
        )
        self.telemetry.metrics.observe_cache(self.cache.stats)
        self.changes = create_change_feed(
            settings.database.url,
            settings.redis,
            redis_prefix=settings.ferrule_cache_prefix,
            redis_timeout_s=settings.ferrule_cache_timeout_ms / 1000,
        )
        self.request_log = RequestLogWriter(self._write_request_log)
        self.health = HealthProbe(self.database, settings.ferrule_health_probe_seconds)
        self.retention = RetentionJob(
            self.database, settings.retention, settings.ferrule_retention_interval_seconds
        )
        self.deps = Dependencies(
            settings=settings,
            database=self.database,
            page_tokens=page_token_codec(settings),
            request_log=self.request_log,
            health=self.health,
            query_observers=self.query_observers,
            cache=self.cache,
            changes=self.changes,
            watch_slots=WatchSlots(
                settings.ferrule_max_watches, settings.ferrule_max_watches_per_caller
            ),
        )
        self.authenticator = build_authenticator(settings)
        self.capacity = CapacityInterceptor(
            max_rpcs=settings.ferrule_max_concurrent_rpcs,
            max_anonymous_streams=settings.ferrule_max_anonymous_streams,
            authenticator=self.authenticator,
        )
        self.server: grpc.aio.Server | None = None
        self.port: int = 0
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int = 0

    async def _write_request_log(self, entries: list[LoggedCall]) -> None:
        await insert_request_log(self.database, entries)

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        chain: list[grpc.aio.ServerInterceptor] = [
            CallContextInterceptor(),
            # Outside error mapping, so the span sees the mapped status code.
            TracingInterceptor(
                tracer_provider=self.telemetry.tracer_provider, metrics=self.telemetry.metrics
            ),
        ]
        if self.settings.ferrule_request_log:
            chain.append(RequestLogInterceptor(self.request_log))
        chain += [
            ErrorMappingInterceptor(),
            self.capacity,
            AuthInterceptor(self.authenticator),
            MalformedRequestInterceptor(),  # innermost: authenticate before parsing complaints
        ]
        return chain

    async def start(self) -> int:
        settings = self.settings
        refusal = settings.plaintext_refusal()
        if refusal is not None:
            raise InsecureListenError(refusal)
        # Concurrency limits live in CapacityInterceptor (grpc.aio's maximum_concurrent_rpcs
        # would put anonymous streams and tenants' calls in one budget).
        # One chain that builds each method's wrapped handler once (server/interceptors/chain.py).
        server = grpc.aio.server(
            interceptors=[InterceptorChain(self._interceptors())], options=grpc_options(settings)
        )
        registration = GenericHandlersOnly(server)
        service_names = register_services(registration, self.deps)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, registration)
        if settings.ferrule_reflection:
            enable_reflection(registration, [*service_names, "grpc.health.v1.Health"])
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = server.add_insecure_port(settings.ferrule_listen)
        else:
            self.port = server.add_secure_port(settings.ferrule_listen, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {settings.ferrule_listen}")
        if self.database.dialect_name == "postgresql" and settings.database_app_role is None:
            log.warning(
                "DATABASE_APP_ROLE is not set: row-level security is not enforced, tenant "
                "isolation rests on the repositories alone (see README, Production)"
            )
        elif self.database.dialect_name == "postgresql":
            await self._warn_when_search_cannot_use_its_index()
        if settings.ferrule_trace_sql_params:
            log.warning(
                "FERRULE_TRACE_SQL_PARAMS is on: SQL parameter values, password hashes "
                "included, are recorded on spans; for debugging on non-production data only"
            )
        await self.health.start()
        await self.changes.start()
        self.request_log.start()
        self.retention.start()
        await server.start()
        self.server = server
        if settings.ferrule_health_listen is not None:
            await self._start_health_listener(settings.ferrule_health_listen)
        log.info("listening on %s (port %d)", settings.ferrule_listen, self.port)
        return self.port

    async def _warn_when_search_cannot_use_its_index(self) -> None:
        try:
            leakproof = await search_sql.pg_match_is_leakproof(self.database)
        except DomainError:
            return  # unreachable now: the health probe reports that, not this check
        if not leakproof:
            log.warning(
                "%s is not LEAKPROOF in this database: under row-level security "
                "SearchAnalyses reads every row of the organization instead of its GIN "
                "index; a superuser runs, in this database: %s (docs/search.md)",
                search_sql.PG_MATCH_FUNCTION,
                search_sql.PG_MARK_MATCH_LEAKPROOF,
            )

    async def _start_health_listener(self, address: str) -> None:
        """Plaintext grpc.health.v1 and nothing else, for probes that cannot speak TLS
        (Kubernetes' native gRPC probes): no credentials cross it and no data leaves it."""
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        health_pb2_grpc.add_HealthServicer_to_server(
            self.health.servicer, GenericHandlersOnly(health_server)
        )
        self.health_port = health_server.add_insecure_port(address)
        if self.health_port == 0:
            raise OSError(f"could not bind {address} (FERRULE_HEALTH_LISTEN)")
        await health_server.start()
        self.health_server = health_server
        log.info("health listening on %s (port %d)", address, self.health_port)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight RPCs finish within `grace`, then release resources.

        Every wait here is bounded by `grace` (a stalled database included): handlers
        cancelled at the end of the grace period roll back, and the request log drains,
        each for at most `grace` more before connections are dropped and rows counted.
        """
        grace = self.settings.ferrule_grace_seconds if grace is None else grace
        self.database.cleanup_timeout = min(self.database.cleanup_timeout, grace)
        await self.health.stop()
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        if self.health_server is not None:
            await self.health_server.stop(0)
            self.health_server = None
        await self.request_log.stop(grace)
        await self.retention.stop()
        await self.changes.close()
        await self.query_observers.aclose()
        await self.cache.close()
        await self.database.dispose()
        self.telemetry.shutdown()
