"""With the input boundary switched off, the database's own refusal still answers
INVALID_ARGUMENT through the real server (the backstop in db/error_translation.py), and an
unexpected exception still answers INTERNAL with nothing of its text.

The boundary is switched off through its one seam: the interceptor looks
``input_boundary.check`` up on the module at every call.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from google.protobuf import struct_pb2

from ferrule.client import Internal, InvalidArgument
from ferrule.v1 import analysis_service_pb2 as apb
from ferrule.v1 import prediction_service_pb2 as ppb
from ferrule.v1 import user_service_pb2 as upb
from server import input_boundary
from tests.server.conftest import RunningServer

SECRET = "s3cret-value"


@pytest.fixture
def boundary_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(input_boundary, "check", lambda message: None)


async def row_count(server: RunningServer, table: str) -> int:
    conn = await asyncpg.connect(server.database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return count
    finally:
        await conn.close()


async def test_postgres_refusals_behind_the_boundary_are_invalid_argument(
    pg_server: RunningServer, boundary_off: None
) -> None:
    admin = pg_server.admin()
    org = await admin.users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="backstop"))
    )
    nul = struct_pb2.Struct()
    nul.fields["label"].string_value = f"{SECRET}\x00"
    calls: list[tuple[str, Any]] = [
        (  # 22021 on INSERT
            "organizations",
            admin.users.CreateOrganization(
                upb.CreateOrganizationRequest(
                    organization=upb.Organization(display_name=f"{SECRET}\x00")
                )
            ),
        ),
        (  # 22021 in a WHERE clause (a filter)
            "predictions",
            admin.predictions.ListPredictions(
                ppb.ListPredictionsRequest(
                    parent=org.name, filter=ppb.PredictionFilter(subject_id=f"{SECRET}\x00")
                )
            ),
        ),
        (  # 22021 in a search pattern
            "users",
            admin.users.SearchUsers(upb.SearchUsersRequest(parent=org.name, query=f"{SECRET}\x00")),
        ),
        (  # 22P05: jsonb cannot hold U+0000
            "text_analyses",
            admin.analyses.CreateAnalysis(
                apb.CreateAnalysisRequest(
                    parent=org.name,
                    analysis=apb.Analysis(
                        text=SECRET, analysis_type=apb.ANALYSIS_TYPE_SENTIMENT, result=nul
                    ),
                )
            ),
        ),
    ]
    for table, call in calls:
        before = await row_count(pg_server, table)
        with pytest.raises(InvalidArgument) as refused:
            await call
        assert SECRET not in str(refused.value.status), refused.value.status
        assert await row_count(pg_server, table) == before


async def test_an_unexpected_exception_answers_internal_without_its_text(
    any_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(message: object) -> None:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(input_boundary, "check", explode)
    with pytest.raises(Internal) as failed:
        await any_server.admin().users.ListOrganizations(upb.ListOrganizationsRequest())
    assert failed.value.message == "internal error"
    assert SECRET not in str(failed.value.status)
