"""Retention deletes what outlived its purpose, and nothing younger."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, text, update

from db.models import IdempotencyKey, IngestBatch, RequestLogEntry, UserSession
from db.models.base import utcnow
from ferrule.v1 import user_service_pb2 as pb
from tests.polling import eventually
from tests.server.conftest import RunningServer

TABLES = ("request_log", "idempotency_keys", "ingest_batches", "user_sessions")


async def _count(server: RunningServer, table: str) -> int:
    async with server.app.database.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def test_retention_purges_old_rows_only(any_server: RunningServer) -> None:
    admin = any_server.admin()
    org = await admin.users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name="r"))
    )
    user = await admin.users.CreateUser(
        pb.CreateUserRequest(
            parent=org.name,
            user=pb.User(
                email="r@example.com",
                auth_provider=pb.AUTH_PROVIDER_GOOGLE,
                role=pb.USER_ROLE_MEMBER,
                status=pb.USER_STATUS_ACTIVE,
            ),
        )
    )
    for _ in range(2):  # one old and one fresh of everything
        await admin.users.CreateUserSession(
            pb.CreateUserSessionRequest(parent=user.name, request_id=str(uuid.uuid4()))
        )
    sessions = await admin.users.ListUserSessions(pb.ListUserSessionsRequest(parent=user.name))
    for session in sessions.user_sessions:
        await admin.users.RevokeUserSession(pb.RevokeUserSessionRequest(name=session.name))
    org_id = org.name.split("/")[1]
    async with any_server.app.database.engine.begin() as conn:
        for batch in ("old-batch", "new-batch"):
            await conn.execute(
                insert(IngestBatch).values(
                    organization_id=uuid.UUID(org_id), batch_id=batch, accepted=1
                )
            )

    async def logged() -> bool:  # the request log is written in the background
        return await _count(any_server, "request_log") >= 4

    await eventually(logged, what="four request log rows")

    before = {table: await _count(any_server, table) for table in TABLES}
    assert all(before[table] >= 2 for table in TABLES), before
    # Age exactly one row of each table past its retention.
    now = utcnow()
    aged: dict[str, tuple[Any, timedelta]] = {  # one entry per table in TABLES
        "request_log": (RequestLogEntry.create_time, timedelta(days=31)),
        "idempotency_keys": (IdempotencyKey.create_time, timedelta(hours=25)),
        "ingest_batches": (IngestBatch.create_time, timedelta(days=8)),
        "user_sessions": (UserSession.revoke_time, timedelta(days=8)),
    }
    async with any_server.app.database.engine.begin() as conn:
        for column, age in aged.values():  # the oldest row of each table
            oldest = select(func.min(column)).scalar_subquery()
            await conn.execute(
                update(column.class_).where(column == oldest).values({column.key: now - age})
            )

    deleted = await any_server.app.retention.run_once(now=now)
    assert deleted == dict.fromkeys(TABLES, 1)
    after = {table: await _count(any_server, table) for table in TABLES}
    for table in TABLES:
        assert after[table] >= before[table] - 1  # the request log may have grown meanwhile
    assert after["ingest_batches"] == before["ingest_batches"] - 1
    assert after["user_sessions"] == before["user_sessions"] - 1
    assert after["idempotency_keys"] == before["idempotency_keys"] - 1
    # A second run finds nothing more to delete.
    assert await any_server.app.retention.run_once(now=now) == dict.fromkeys(TABLES, 0)
