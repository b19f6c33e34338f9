"""The read-through cache end to end: the real server, real Redis and PostgreSQL, called
only through the client.

Each Redis-backed test uses its own key prefix (never FLUSHDB: the Redis is shared), and
statements are counted with an SQLAlchemy event on the server's primary engine (and, for
the point reads that bypass its events, on the driver connection), so a "hit" is proven
by the database not being asked, not by the cache's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import asyncpg
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message
from sqlalchemy import event

from db.point_reads import PointReader
from ferrule.client import (
    AsyncFerruleClient,
    Cancelled,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
)
from ferrule.v1 import analysis_service_pb2 as apb
from ferrule.v1 import health_service_pb2 as hpb
from ferrule.v1 import prediction_service_pb2 as ppb
from ferrule.v1 import user_service_pb2 as upb
from tests.db.cache_fixtures import RedisProcess
from tests.polling import DEADLINE_S, eventually
from tests.server.conftest import RunningServer, StartServer

PASSWORD = "correct horse battery staple"
NOW = datetime.now(UTC)


# --- helpers ----------------------------------------------------------------------------
@contextlib.contextmanager
def statements(server: RunningServer, table: str) -> Iterator[list[str]]:
    """Every statement the server sends to the primary that reads ``table`` (FROM/JOIN),
    while the block runs: through SQLAlchemy, and as point reads on the driver connection
    (cache loaders, db/point_reads.py), which SQLAlchemy's events do not see."""
    pattern = re.compile(rf"\b(FROM|JOIN)\s+{re.escape(table)}\b", re.IGNORECASE)
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if pattern.search(statement):
            seen.append(statement)

    on_driver = PointReader._fetch_on_driver

    async def point_read(reader: PointReader, sql: str, args: list[Any]) -> Any:
        if reader.engine is server.app.database.engine and pattern.search(sql):
            seen.append(sql)
        return await on_driver(reader, sql, args)

    engine = server.app.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        with mock.patch.object(PointReader, "_fetch_on_driver", point_read):
            yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


@dataclass
class Org:
    id: str
    parent: str
    client: AsyncFerruleClient


async def new_org(server: RunningServer, client: AsyncFerruleClient | None = None) -> Org:
    org = await server.admin().users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="cache"))
    )
    org_id = org.name.rpartition("/")[2]
    chosen = client or server.for_org(org_id, scope="read write admin")
    return Org(org_id, org.name, chosen)


async def new_user(org: Org, email: str | None = None, **fields: Any) -> upb.User:
    user = upb.User(
        email=email or f"{uuid.uuid4().hex[:10]}@example.com",
        username="u" + uuid.uuid4().hex[:8],
        role=fields.pop("role", upb.USER_ROLE_MEMBER),
        status=fields.pop("status", upb.USER_STATUS_ACTIVE),
        auth_provider=upb.AUTH_PROVIDER_EMAIL,
        **fields,
    )
    return await org.client.users.CreateUser(
        upb.CreateUserRequest(parent=org.parent, user=user, password=PASSWORD)
    )


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def stamp(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def prediction(probability: float = 0.5, at: datetime | None = None) -> ppb.Prediction:
    message = ppb.Prediction(
        subject_id="emp-1", probability=probability, model_name="attrition", model_version="v1"
    )
    if at is not None:
        message.predict_time.CopyFrom(stamp(at))
    return message


async def cached_server(
    start_server: StartServer, database_url: str, redis_url: str, **overrides: Any
) -> RunningServer:
    prefix = f"ferrule-test-{uuid.uuid4().hex[:12]}"
    return await start_server(
        database_url, redis_url=redis_url, ferrule_cache_prefix=prefix, **overrides
    )


@pytest.fixture
async def srv(server_database_url: str, start_server: StartServer, redis_url: str) -> RunningServer:
    """A cached server on PostgreSQL and on MariaDB (the invalidation table runs on both)."""
    return await cached_server(start_server, server_database_url, redis_url)


# --- hit after miss ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["redis", "local"])
async def test_a_second_get_is_a_hit_and_still_checks_the_organization(
    start_server: StartServer, pg_database_url: str, redis_url: str, backend: str
) -> None:
    if backend == "redis":
        server = await cached_server(start_server, pg_database_url, redis_url)
    else:
        server = await start_server(pg_database_url)  # no REDIS_URL: the in-process LRU
    assert server.app.cache.stats().backend == backend
    org = await new_org(server)
    user = await new_user(org)
    if backend == "redis":
        # The near cache keeps values only while Redis tracks them for it: its listener,
        # started by the first Redis call (the writes above), must have subscribed, which
        # a loaded machine can delay past the reads below.
        await eventually(
            lambda: server.app.cache.stats().near_tracking, what="the near cache tracking"
        )
    request = upb.GetUserRequest(name=user.name)
    with statements(server, "users") as first:
        assert await org.client.users.GetUser(request) == user
    assert len(first) == 1
    hits = server.app.cache.stats().hits
    with statements(server, "users") as second:
        assert await org.client.users.GetUser(request) == user
    assert second == []  # the database was not asked
    assert server.app.cache.stats().hits == hits + 1
    report = await server.admin().health.GetHealthReport(hpb.GetHealthReportRequest())
    assert report.cache.hits >= 1
    if backend == "redis":
        # The near cache's figures sit beside the others: the second read came from memory.
        assert report.cache.near_hits >= 1
        assert report.cache.near_entries >= 1
        assert report.cache.near_tracking
    else:
        assert (report.cache.near_hits, report.cache.near_tracking) == (0, False)

    # A cached entry is never a way around the organization check.
    other = await new_org(server)
    with pytest.raises(PermissionDenied):
        await other.client.users.GetUser(request)
    stats = upb.GetUserStatisticsRequest(parent=org.parent)
    await org.client.users.GetUserStatistics(stats)
    with pytest.raises(PermissionDenied):
        await other.client.users.GetUserStatistics(stats)


# --- every write invalidates what it changes --------------------------------------------
Read = Callable[[], Awaitable[Message | str]]
Write = Callable[[], Awaitable[object]]
Check = Callable[[Any, Any], bool]


@dataclass
class Case:
    """Warm ``read`` (twice: the second must be a hit), ``write``, read again: ``changed``
    (before, after) must hold."""

    read: Read
    write: Write
    changed: Check


def not_found_as_text(read: Callable[[], Awaitable[Message]]) -> Read:
    async def wrapped() -> Message | str:
        try:
            return await read()
        except NotFound:
            return "NOT_FOUND"

    return wrapped


async def _org_case(org: Org, server: RunningServer, write: str) -> Case:
    target = await new_org(server)
    admin = server.admin()

    async def read() -> upb.Organization:
        return await admin.users.GetOrganization(upb.GetOrganizationRequest(name=target.parent))

    if write == "UndeleteOrganization":
        await admin.users.DeleteOrganization(upb.DeleteOrganizationRequest(name=target.parent))
    writes: dict[str, Write] = {
        "UpdateOrganization": lambda: admin.users.UpdateOrganization(
            upb.UpdateOrganizationRequest(
                organization=upb.Organization(name=target.parent, display_name="renamed"),
                update_mask=mask("display_name"),
            )
        ),
        "DeleteOrganization": lambda: admin.users.DeleteOrganization(
            upb.DeleteOrganizationRequest(name=target.parent)
        ),
        "UndeleteOrganization": lambda: admin.users.UndeleteOrganization(
            upb.UndeleteOrganizationRequest(name=target.parent)
        ),
    }
    return Case(read, writes[write], lambda a, b: a.etag != b.etag)


async def _user_case(org: Org, write: str) -> Case:
    users = org.client.users
    user = await new_user(org)

    async def get() -> upb.User:
        return await users.GetUser(upb.GetUserRequest(name=user.name))

    async def stats() -> upb.UserStatistics:
        return await users.GetUserStatistics(upb.GetUserStatisticsRequest(parent=org.parent))

    def total_moved(a: upb.UserStatistics, b: upb.UserStatistics) -> bool:
        return a.total_users != b.total_users

    if write in {"UndeleteUser", "UndeleteUser->stats"}:
        await users.DeleteUser(upb.DeleteUserRequest(name=user.name))
    update_role = upb.UpdateUserRequest(
        user=upb.User(name=user.name, role=upb.USER_ROLE_ADMIN), update_mask=mask("role")
    )
    cases: dict[str, Case] = {
        "CreateUser": Case(stats, lambda: new_user(org), total_moved),
        "UpdateUser": Case(
            get,
            lambda: users.UpdateUser(
                upb.UpdateUserRequest(
                    user=upb.User(name=user.name, full_name="New Name"),
                    update_mask=mask("full_name"),
                )
            ),
            lambda a, b: (a.full_name, b.full_name) == ("", "New Name"),
        ),
        "UpdateUser->stats": Case(
            stats,
            lambda: users.UpdateUser(update_role),
            lambda a, b: list(a.role_counts) != list(b.role_counts),
        ),
        "DeleteUser": Case(
            get,
            lambda: users.DeleteUser(upb.DeleteUserRequest(name=user.name)),
            lambda a, b: not a.HasField("delete_time") and b.HasField("delete_time"),
        ),
        "DeleteUser->stats": Case(
            stats, lambda: users.DeleteUser(upb.DeleteUserRequest(name=user.name)), total_moved
        ),
        "UndeleteUser": Case(
            get,
            lambda: users.UndeleteUser(upb.UndeleteUserRequest(name=user.name)),
            lambda a, b: a.HasField("delete_time") and not b.HasField("delete_time"),
        ),
        "UndeleteUser->stats": Case(
            stats,
            lambda: users.UndeleteUser(upb.UndeleteUserRequest(name=user.name)),
            total_moved,
        ),
        "SetUserPassword": Case(
            get,
            lambda: users.SetUserPassword(
                upb.SetUserPasswordRequest(name=user.name, password="another good password")
            ),
            lambda a, b: a.etag != b.etag,
        ),
        "VerifyPassword": Case(
            get,
            lambda: users.VerifyPassword(
                upb.VerifyPasswordRequest(parent=org.parent, email=user.email, password=PASSWORD)
            ),
            lambda a, b: not a.HasField("last_login_time") and b.HasField("last_login_time"),
        ),
    }
    if write == "RevokeUserSession":
        # Sessions are not cached: the read must still reflect the revoke.
        created = await users.CreateUserSession(
            upb.CreateUserSessionRequest(parent=user.name, user_session=upb.UserSession())
        )

        async def session() -> upb.UserSession:
            return await users.GetUserSession(upb.GetUserSessionRequest(name=created.name))

        return Case(
            session,
            lambda: users.RevokeUserSession(upb.RevokeUserSessionRequest(name=created.name)),
            lambda a, b: b.state == upb.SESSION_STATE_REVOKED != a.state,
        )
    return cases[write]


async def _analysis_case(org: Org, write: str) -> Case:
    analyses = org.client.analyses
    batch = await analyses.CreateBatch(
        apb.CreateBatchRequest(parent=org.parent, batch=apb.AnalysisBatch(display_name="b"))
    )
    other_batch = await analyses.CreateBatch(
        apb.CreateBatchRequest(parent=org.parent, batch=apb.AnalysisBatch(display_name="b2"))
    )
    member = await analyses.CreateAnalysis(
        apb.CreateAnalysisRequest(
            parent=org.parent,
            analysis=apb.Analysis(
                text=uuid.uuid4().hex, analysis_type=apb.ANALYSIS_TYPE_SENTIMENT, batch=batch.name
            ),
        )
    )

    async def get() -> apb.Analysis:
        return await analyses.GetAnalysis(apb.GetAnalysisRequest(name=member.name))

    async def get_batch() -> apb.AnalysisBatch:
        return await analyses.GetBatch(apb.GetBatchRequest(name=batch.name))

    async def stats() -> apb.AnalysisStatistics:
        return await analyses.GetAnalysisStatistics(
            apb.GetAnalysisStatisticsRequest(parent=org.parent)
        )

    def new_analysis(in_batch: bool) -> apb.Analysis:
        return apb.Analysis(
            text=uuid.uuid4().hex,
            analysis_type=apb.ANALYSIS_TYPE_QUALITY,
            batch=batch.name if in_batch else "",
        )

    def members(a: apb.AnalysisBatch, b: apb.AnalysisBatch) -> bool:
        return a.progress.total_count != b.progress.total_count

    start = apb.UpdateAnalysisRequest(
        analysis=apb.Analysis(name=member.name, state=apb.ANALYSIS_STATE_PROCESSING),
        update_mask=mask("state"),
    )
    move = apb.UpdateAnalysisRequest(
        analysis=apb.Analysis(name=member.name, batch=other_batch.name), update_mask=mask("batch")
    )
    delete = apb.DeleteAnalysisRequest(name=member.name)
    undelete = apb.UndeleteAnalysisRequest(name=member.name)
    if write.startswith("UndeleteAnalysis"):
        await analyses.DeleteAnalysis(delete)
    if write == "UndeleteBatch":
        await analyses.DeleteBatch(apb.DeleteBatchRequest(name=batch.name))
    cases: dict[str, Case] = {
        "CreateAnalysis": Case(
            stats,
            lambda: analyses.CreateAnalysis(
                apb.CreateAnalysisRequest(parent=org.parent, analysis=new_analysis(False))
            ),
            lambda a, b: a.total_count + 1 == b.total_count,
        ),
        "CreateAnalysis->batch": Case(
            get_batch,
            lambda: analyses.CreateAnalysis(
                apb.CreateAnalysisRequest(parent=org.parent, analysis=new_analysis(True))
            ),
            members,
        ),
        "BatchCreateAnalyses->batch": Case(
            get_batch,
            lambda: analyses.BatchCreateAnalyses(
                apb.BatchCreateAnalysesRequest(
                    parent=org.parent,
                    requests=[
                        apb.CreateAnalysisRequest(analysis=new_analysis(True)) for _ in range(3)
                    ],
                )
            ),
            lambda a, b: a.progress.total_count + 3 == b.progress.total_count,
        ),
        "UpdateAnalysis": Case(
            get,
            lambda: analyses.UpdateAnalysis(start),
            lambda a, b: b.state == apb.ANALYSIS_STATE_PROCESSING != a.state,
        ),
        "UpdateAnalysis->stats": Case(
            stats,
            lambda: analyses.UpdateAnalysis(start),
            lambda a, b: list(a.state_counts) != list(b.state_counts),
        ),
        "UpdateAnalysis->batch": Case(
            get_batch,
            lambda: analyses.UpdateAnalysis(start),
            lambda a, b: b.progress.processing_count == a.progress.processing_count + 1,
        ),
        "UpdateAnalysis(move)->old batch": Case(
            get_batch, lambda: analyses.UpdateAnalysis(move), members
        ),
        "DeleteAnalysis": Case(
            get,
            lambda: analyses.DeleteAnalysis(delete),
            lambda a, b: b.HasField("delete_time") and not a.HasField("delete_time"),
        ),
        "DeleteAnalysis->stats": Case(
            stats,
            lambda: analyses.DeleteAnalysis(delete),
            lambda a, b: a.total_count - 1 == b.total_count,
        ),
        "DeleteAnalysis->batch": Case(get_batch, lambda: analyses.DeleteAnalysis(delete), members),
        "UndeleteAnalysis": Case(
            get,
            lambda: analyses.UndeleteAnalysis(undelete),
            lambda a, b: a.HasField("delete_time") and not b.HasField("delete_time"),
        ),
        "UndeleteAnalysis->batch": Case(
            get_batch, lambda: analyses.UndeleteAnalysis(undelete), members
        ),
        "UpdateBatch": Case(
            get_batch,
            lambda: analyses.UpdateBatch(
                apb.UpdateBatchRequest(
                    batch=apb.AnalysisBatch(name=batch.name, display_name="renamed"),
                    update_mask=mask("display_name"),
                )
            ),
            lambda a, b: b.display_name == "renamed" != a.display_name,
        ),
        "DeleteBatch": Case(
            get_batch,
            lambda: analyses.DeleteBatch(apb.DeleteBatchRequest(name=batch.name)),
            lambda a, b: b.HasField("delete_time") and not a.HasField("delete_time"),
        ),
        "UndeleteBatch": Case(
            get_batch,
            lambda: analyses.UndeleteBatch(apb.UndeleteBatchRequest(name=batch.name)),
            lambda a, b: a.HasField("delete_time") and not b.HasField("delete_time"),
        ),
    }
    return cases[write]


async def _prediction_case(org: Org, write: str) -> Case:
    predictions = org.client.predictions
    old = await predictions.CreatePrediction(
        ppb.CreatePredictionRequest(
            parent=org.parent, prediction=prediction(0.9, NOW - timedelta(days=30))
        )
    )

    async def stats() -> ppb.PredictionStatistics:
        return await predictions.GetPredictionStatistics(
            ppb.GetPredictionStatisticsRequest(parent=org.parent)
        )

    async def risk() -> ppb.RiskDistribution:
        return await predictions.GetRiskDistribution(
            ppb.GetRiskDistributionRequest(parent=org.parent)
        )

    async def stream() -> None:
        async def source() -> AsyncIterator[ppb.StreamPredictionsRequest]:
            for n in range(3):
                yield ppb.StreamPredictionsRequest(
                    parent=org.parent,
                    batch_id=f"b-{n}",
                    predictions=[prediction(0.1) for _ in range(50)],
                )

        acks = [a async for a in predictions.StreamPredictions(source(), timeout=30)]
        assert sum(a.accepted for a in acks) == 150

    older_than = duration_pb2.Duration()
    older_than.FromTimedelta(timedelta(days=1))
    purge = ppb.PurgePredictionsRequest(parent=org.parent, older_than=older_than)

    def counted(a: Any, b: Any) -> bool:
        return bool(a.count != b.count) if hasattr(a, "count") else a.total_count != b.total_count

    cases: dict[str, Case] = {
        "CreatePrediction": Case(
            stats,
            lambda: predictions.CreatePrediction(
                ppb.CreatePredictionRequest(parent=org.parent, prediction=prediction(0.2))
            ),
            counted,
        ),
        "BatchCreatePredictions": Case(
            risk,
            lambda: predictions.BatchCreatePredictions(
                ppb.BatchCreatePredictionsRequest(
                    parent=org.parent,
                    requests=[
                        ppb.CreatePredictionRequest(prediction=prediction(0.95)) for _ in range(4)
                    ],
                )
            ),
            lambda a, b: a.high_count + 4 == b.high_count,
        ),
        "StreamPredictions": Case(stats, stream, lambda a, b: a.count + 150 == b.count),
        "PurgePredictions": Case(
            not_found_as_text(
                lambda: predictions.GetPrediction(ppb.GetPredictionRequest(name=old.name))
            ),
            lambda: predictions.PurgePredictions(purge),
            lambda a, b: a == old and b == "NOT_FOUND",
        ),
        "PurgePredictions->stats": Case(risk, lambda: predictions.PurgePredictions(purge), counted),
    }
    return cases[write]


WRITES = [
    *("UpdateOrganization", "DeleteOrganization", "UndeleteOrganization"),
    *("CreateUser", "UpdateUser", "UpdateUser->stats", "DeleteUser", "DeleteUser->stats"),
    *("UndeleteUser", "UndeleteUser->stats", "SetUserPassword", "VerifyPassword"),
    "RevokeUserSession",
    *("CreateAnalysis", "CreateAnalysis->batch", "BatchCreateAnalyses->batch"),
    *("UpdateAnalysis", "UpdateAnalysis->stats", "UpdateAnalysis->batch"),
    *("UpdateAnalysis(move)->old batch", "DeleteAnalysis", "DeleteAnalysis->stats"),
    *("DeleteAnalysis->batch", "UndeleteAnalysis", "UndeleteAnalysis->batch"),
    *("UpdateBatch", "DeleteBatch", "UndeleteBatch"),
    *("CreatePrediction", "BatchCreatePredictions", "StreamPredictions"),
    *("PurgePredictions", "PurgePredictions->stats"),
]


async def build_case(server: RunningServer, org: Org, write: str) -> Case:
    method = write.split("->")[0].split("(")[0]
    if method.endswith("Organization"):
        return await _org_case(org, server, method)
    if "User" in method or method == "VerifyPassword":
        return await _user_case(org, write)
    if "Prediction" not in method and ("Analys" in method or "Batch" in method):
        return await _analysis_case(org, write)
    return await _prediction_case(org, write)


async def test_every_write_rpc_invalidates_what_it_changes(srv: RunningServer) -> None:
    """Table-driven: for each write, the cached read it can change reflects it at once."""
    cache = srv.app.cache
    failures: list[str] = []
    for write in WRITES:
        org = await new_org(srv)
        case = await build_case(srv, org, write)
        before = await case.read()

        async def served_from_cache() -> bool:
            hits = cache.stats().hits
            assert await case.read() == before, write  # noqa: B023 (awaited right here)
            return cache.stats().hits > hits

        # The write must find the value cached, or the check below proves nothing. Each
        # cache call is bounded by FERRULE_CACHE_TIMEOUT_MS, so on a busy machine a fill
        # can be given up (the read is still answered, from the database): read again
        # until one is served from the cache. (A session listing is never cached.)
        if write != "RevokeUserSession":
            await eventually(served_from_cache, what=f"{write}: a read served from the cache")
        await case.write()
        after = await case.read()
        if not case.changed(before, after):
            failures.append(f"{write}: {before!r} -> {after!r}")
    assert failures == []


async def test_statistics_generations_move_once_per_write_and_only_their_area(
    srv: RunningServer, redis_url: str
) -> None:
    org = await new_org(srv)
    prefix = srv.app.cache.prefix
    redis = aioredis.Redis.from_url(redis_url)

    async def generation(area: str) -> int:
        value = await redis.get(f"{prefix}:gen:{area}.{org.id}")
        return int(value) if value is not None else 0

    try:
        stats = upb.GetUserStatisticsRequest(parent=org.parent)
        await org.client.users.GetUserStatistics(stats)  # creates the counter
        users_before = await generation("users")
        analyses_before = await generation("analyses")
        user = await new_user(org)
        assert await generation("users") == users_before + 1
        # A change the counts do not depend on leaves the generation alone.
        await org.client.users.UpdateUser(
            upb.UpdateUserRequest(
                user=upb.User(name=user.name, full_name="X"), update_mask=mask("full_name")
            )
        )
        assert await generation("users") == users_before + 1
        assert await generation("analyses") == analyses_before  # another area
        assert (await org.client.users.GetUserStatistics(stats)).total_users == 1

        # A stream of many rows bumps once per committed transaction, not per row.
        await org.client.predictions.GetPredictionStatistics(
            ppb.GetPredictionStatisticsRequest(parent=org.parent)
        )
        before = await generation("predictionstats")
        rows_per_batch, batches = 200, 4

        async def source() -> AsyncIterator[ppb.StreamPredictionsRequest]:
            for n in range(batches):
                yield ppb.StreamPredictionsRequest(
                    parent=org.parent,
                    batch_id=f"g-{n}",
                    predictions=[prediction(0.3) for _ in range(rows_per_batch)],
                )

        acks = [a async for a in org.client.predictions.StreamPredictions(source(), timeout=30)]
        assert len(acks) == batches
        bumps = await generation("predictionstats") - before
        assert 1 <= bumps <= batches
        assert await generation("predictions") == 0  # the Gets' counter moves on purge only
        got = await org.client.predictions.GetPredictionStatistics(
            ppb.GetPredictionStatisticsRequest(parent=org.parent)
        )
        assert got.count == rows_per_batch * batches
    finally:
        await redis.aclose()


# --- single-flight ----------------------------------------------------------------------
async def test_concurrent_misses_of_one_key_cost_one_select(srv: RunningServer) -> None:
    org = await new_org(srv)
    user = await new_user(org)  # a create never fills the cache: the key is cold
    request = upb.GetUserRequest(name=user.name)
    with statements(srv, "users") as seen:
        replies = await asyncio.gather(*(org.client.users.GetUser(request) for _ in range(50)))
    assert all(reply == user for reply in replies)
    assert len(seen) == 1, seen


# --- TTL --------------------------------------------------------------------------------
async def test_entries_expire_after_the_configured_ttl(
    start_server: StartServer, pg_database_url: str, redis_url: str
) -> None:
    server = await cached_server(
        start_server, pg_database_url, redis_url, ferrule_cache_ttl_seconds=0.5
    )
    org = await new_org(server)
    user = await new_user(org)
    request = upb.GetUserRequest(name=user.name)
    assert (await org.client.users.GetUser(request)).full_name == ""
    # Behind the server's back (no invalidation): only the TTL can end the cached entry.
    conn = await asyncpg.connect(pg_database_url.replace("+asyncpg", ""))
    try:
        await conn.execute(
            "UPDATE users SET full_name = 'changed' WHERE id = $1",
            uuid.UUID(user.name.rpartition("/")[2]),
        )
    finally:
        await conn.close()
    assert (await org.client.users.GetUser(request)).full_name == ""  # still cached

    async def expired() -> bool:
        return (await org.client.users.GetUser(request)).full_name == "changed"

    await eventually(expired, what="the entry expiring at its TTL", interval=0.1)


# --- two server processes ---------------------------------------------------------------
async def test_no_stale_read_across_two_servers_sharing_redis(
    start_server: StartServer, pg_database_url: str, redis_url: str
) -> None:
    prefix = f"ferrule-test-{uuid.uuid4().hex[:12]}"
    one = await start_server(pg_database_url, redis_url=redis_url, ferrule_cache_prefix=prefix)
    two = await start_server(
        pg_database_url, migrate=False, redis_url=redis_url, ferrule_cache_prefix=prefix
    )
    org = await new_org(one)
    writer = org.client
    reader = two.for_org(org.id, scope="read write admin")
    stats = upb.GetUserStatisticsRequest(parent=org.parent)
    for round_ in range(5):
        user = await new_user(org)  # via server one
        get = upb.GetUserRequest(name=user.name)
        assert await reader.users.GetUser(get) == user  # warm server two
        assert await reader.users.GetUser(get) == user
        assert (await reader.users.GetUserStatistics(stats)).total_users == round_ + 1
        updated = await writer.users.UpdateUser(
            upb.UpdateUserRequest(
                user=upb.User(name=user.name, full_name=f"round {round_}"),
                update_mask=mask("full_name"),
            )
        )
        assert await reader.users.GetUser(get) == updated
        await writer.users.DeleteUser(upb.DeleteUserRequest(name=user.name))
        assert (await reader.users.GetUser(get)).HasField("delete_time")
        assert (await reader.users.GetUserStatistics(stats)).total_users == round_
        await writer.users.UndeleteUser(upb.UndeleteUserRequest(name=user.name))
    assert two.app.cache.stats().hits > 0


# --- cancellation -----------------------------------------------------------------------
async def test_cancelled_calls_leave_every_later_reply_for_its_own_key(
    srv: RunningServer, redis_url: str
) -> None:
    org = await new_org(srv)
    users = [await new_user(org) for _ in range(20)]
    rng = random.Random(6)

    async def abandoned(user: upb.User) -> None:
        request = upb.GetUserRequest(name=user.name)
        if rng.random() < 0.5:
            call = org.client.users.GetUser(request)
            await asyncio.sleep(rng.uniform(0, 0.005))
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Cancelled, DeadlineExceeded):
                await call
        else:
            with contextlib.suppress(DeadlineExceeded, Cancelled):
                await org.client.users.GetUser(request, timeout=rng.uniform(0.001, 0.01))

    for _ in range(4):
        await asyncio.gather(*(abandoned(rng.choice(users)) for _ in range(100)))
    # Every later reply, concurrent and sequential, is for the key it asked for.
    for _ in range(3):
        order = rng.sample(users, len(users))
        replies = await asyncio.gather(
            *(org.client.users.GetUser(upb.GetUserRequest(name=u.name)) for u in order)
        )
        assert replies == order
    # And what the cache holds under each key is that key's user. A lease taken by a
    # load whose callers all left keeps its key unfilled until it expires (lease_ms),
    # so wait (bounded) for every key to be filled again.
    redis: aioredis.Redis = aioredis.Redis.from_url(redis_url)
    try:
        missing = list(users)
        deadline = time.monotonic() + DEADLINE_S
        while missing:
            assert time.monotonic() < deadline, f"{len(missing)} keys never filled again"
            still: list[upb.User] = []
            for user in missing:
                assert await org.client.users.GetUser(upb.GetUserRequest(name=user.name)) == user
                user_id = user.name.rpartition("/")[2]
                raw = await redis.get(f"{srv.app.cache.prefix}:user:{org.id}:{user_id}")
                if raw is None:
                    still.append(user)
                else:
                    assert isinstance(raw, bytes)
                    assert upb.User.FromString(raw) == user
            missing = still
            if missing:
                await asyncio.sleep(0.2)
    finally:
        await redis.aclose()


# --- Redis dies and comes back ----------------------------------------------------------
async def test_redis_outage_mid_burst_fails_no_call_and_recovers(
    start_server: StartServer, pg_database_url: str
) -> None:
    redis_process = RedisProcess()
    redis_process.start()
    try:
        server = await start_server(
            pg_database_url,
            redis_url=redis_process.url,
            ferrule_cache_prefix=f"ferrule-test-{uuid.uuid4().hex[:12]}",
            database_pool_size=10,
        )
        org = await new_org(server)
        users = [await new_user(org) for _ in range(10)]
        for user in users:  # warm
            await org.client.users.GetUser(upb.GetUserRequest(name=user.name))
        answered = 0
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def worker(seed: int) -> None:
            nonlocal answered
            rng = random.Random(seed)
            while not stop.is_set():
                user = rng.choice(users)
                try:
                    # The deadline bounds what an outage may cost a call: the cache's own
                    # timeout, then the database, never a hang on a dead connection.
                    got = await org.client.users.GetUser(
                        upb.GetUserRequest(name=user.name), timeout=10
                    )
                    assert got == user
                except Exception as exc:
                    failures.append(exc)
                answered += 1

        workers = [asyncio.create_task(worker(n)) for n in range(20)]
        await eventually(lambda: answered >= 100, what="the burst under way")
        redis_process.kill()  # mid-burst
        killed_at = answered
        # Calls keep being answered after the kill.
        await eventually(lambda: answered >= killed_at + 200, what="calls answered after the kill")
        stop.set()
        await asyncio.gather(*workers)
        assert failures == []

        report = await server.admin().health.GetHealthReport(hpb.GetHealthReportRequest())
        assert report.cache.degraded
        assert not report.cache.reachable

        redis_process.start()  # the same port: the server's URL
        hits = server.app.cache.stats().hits
        deadline = time.monotonic() + DEADLINE_S
        while True:
            for user in users:
                assert await org.client.users.GetUser(upb.GetUserRequest(name=user.name)) == user
            report = await server.admin().health.GetHealthReport(hpb.GetHealthReportRequest())
            if not report.cache.degraded and server.app.cache.stats().hits > hits:
                break
            assert time.monotonic() < deadline, "the cache did not come back"
            await asyncio.sleep(0.2)
        assert report.cache.reachable
    finally:
        redis_process.kill()
