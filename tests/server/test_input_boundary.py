"""The input boundary (server/input_boundary.py), on PostgreSQL and SQLite, through the client.

Each value here once answered INTERNAL or was stored and broke later reads. The boundary
refuses them with INVALID_ARGUMENT naming the field path (UNAUTHENTICATED for a token's
claims), and a refused call writes nothing.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jwt
import pytest
from google.protobuf import duration_pb2, struct_pb2

from db.models import Organization, Prediction, UserSession
from ferrule.client import InvalidArgument, Unauthenticated
from ferrule.v1 import analysis_service_pb2 as apb
from ferrule.v1 import prediction_service_pb2 as ppb
from ferrule.v1 import user_service_pb2 as upb
from server import input_boundary
from tests.server.conftest import JWT_SECRET, RunningServer


def declared_length(model: Any, column: str) -> int | None:
    """The length as the model declares it, read independently of the boundary."""
    length: int | None = getattr(model.__table__.c[column].type, "length", None)
    return length


def fields(error: InvalidArgument) -> list[str]:
    return [field for field, _ in error.field_violations]


async def new_org(server: RunningServer, display_name: str = "boundary") -> str:
    org = await server.admin().users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name=display_name))
    )
    return org.name


def nested_struct(levels: int) -> struct_pb2.Struct:
    """A Struct ``levels`` deep: {"k": {"k": ... {}}}."""
    top = struct_pb2.Struct()
    current = top
    for _ in range(levels - 1):
        current = current.fields["k"].struct_value
    current.fields["leaf"].bool_value = True
    return top


def test_text_limits_are_the_model_columns_lengths() -> None:
    """Derived from the SQLAlchemy model, so widening a column widens the boundary."""
    limit = input_boundary.text_limit
    display_name = declared_length(Organization, "display_name")
    assert limit("ferrule.v1.Organization", "display_name") == display_name
    assert limit("ferrule.v1.PredictionFilter", "subject_id") == (
        declared_length(Prediction, "subject_id")
    )
    assert limit("ferrule.v1.UserSession", "ip_address") == declared_length(UserSession, "peer")
    assert limit("ferrule.v1.Analysis", "text") is None  # an unbounded Text column
    # A field that reaches no column is still bounded (it reaches logs and parsers).
    assert limit("ferrule.v1.ListUsersRequest", "page_token") == input_boundary.UNMAPPED_MAX_CHARS


@pytest.mark.parametrize(
    "value",
    ["\x00", "ok\x00tail", "x" * 256],
    ids=["nul", "mixed-nul", "over-long"],
)
async def test_text_that_a_column_cannot_hold_is_refused_naming_the_field(
    any_server: RunningServer, value: str
) -> None:
    admin = any_server.admin()
    before = await admin.users.ListOrganizations(upb.ListOrganizationsRequest())
    with pytest.raises(InvalidArgument) as refused:
        await admin.users.CreateOrganization(
            upb.CreateOrganizationRequest(organization=upb.Organization(display_name=value))
        )
    assert fields(refused.value) == ["organization.display_name"]
    after = await admin.users.ListOrganizations(upb.ListOrganizationsRequest())
    assert list(after.organizations) == list(before.organizations)


async def test_text_at_the_columns_length_with_emoji_and_bidi_controls_is_stored(
    any_server: RunningServer,
) -> None:
    parent = await new_org(any_server)
    limit = input_boundary.text_limit("ferrule.v1.Prediction", "subject_id")
    assert limit is not None and limit == declared_length(Prediction, "subject_id")
    value = ("🚀\u202eé\u2067x" * limit)[:limit]
    client = any_server.admin()

    def create(subject_id: str) -> Any:
        return client.predictions.CreatePrediction(
            ppb.CreatePredictionRequest(
                parent=parent,
                prediction=ppb.Prediction(
                    subject_id=subject_id, model_version="v1", probability=0.5
                ),
            )
        )

    created = await create(value)
    got = await client.predictions.GetPrediction(ppb.GetPredictionRequest(name=created.name))
    assert got.subject_id == value
    with pytest.raises(InvalidArgument) as refused:
        await create(value + "x")
    assert fields(refused.value) == ["prediction.subject_id"]


async def test_nul_in_filters_and_queries_is_refused(any_server: RunningServer) -> None:
    parent = await new_org(any_server)
    client = any_server.admin()
    calls: list[tuple[Any, str]] = [
        (
            client.users.SearchUsers(upb.SearchUsersRequest(parent=parent, query="a\x00")),
            "query",
        ),
        (
            client.analyses.ListAnalyses(
                apb.ListAnalysesRequest(parent=parent, model_used="m\x00")
            ),
            "model_used",
        ),
        (
            client.analyses.ListModelPerformances(
                apb.ListModelPerformancesRequest(parent=parent, model_name="\x00")
            ),
            "model_name",
        ),
        (
            client.predictions.GetPredictionStatistics(
                ppb.GetPredictionStatisticsRequest(
                    parent=parent, filter=ppb.PredictionFilter(subject_id="s\x00")
                )
            ),
            "filter.subject_id",
        ),
    ]
    for call, field in calls:
        with pytest.raises(InvalidArgument) as refused:
            await call
        assert fields(refused.value) == [field]


async def test_structured_values_are_bounded(any_server: RunningServer) -> None:
    parent = await new_org(any_server)
    client = any_server.admin()
    deep = input_boundary.MAX_NESTING + 1
    not_finite = struct_pb2.Struct()
    not_finite.fields["score"].number_value = math.nan
    cases: list[tuple[ppb.Prediction, str]] = [
        (ppb.Prediction(features=nested_struct(deep)), "prediction.features.k"),
        (ppb.Prediction(features=not_finite), "prediction.features.score"),
        (ppb.Prediction(probability=math.inf), "prediction.probability"),
    ]
    for prediction, field in cases:
        prediction.subject_id, prediction.model_version = "s", "v1"
        with pytest.raises(InvalidArgument) as refused:
            await client.predictions.CreatePrediction(
                ppb.CreatePredictionRequest(parent=parent, prediction=prediction)
            )
        assert any(f.startswith(field) for f in fields(refused.value)), fields(refused.value)
    # Exactly the maximum nesting is accepted and reads back.
    ok = ppb.Prediction(
        subject_id="s",
        model_version="v1",
        probability=0.5,
        features=nested_struct(input_boundary.MAX_NESTING),
    )
    created = await client.predictions.CreatePrediction(
        ppb.CreatePredictionRequest(parent=parent, prediction=ok)
    )
    got = await client.predictions.GetPrediction(ppb.GetPredictionRequest(name=created.name))
    assert got.features == ok.features
    # NaN inside an analysis result (a Struct stored as JSON).
    with pytest.raises(InvalidArgument) as refused:
        await client.analyses.CreateAnalysis(
            apb.CreateAnalysisRequest(
                parent=parent,
                analysis=apb.Analysis(
                    text="t",
                    analysis_type=apb.ANALYSIS_TYPE_SENTIMENT,
                    result=not_finite,
                ),
            )
        )
    assert fields(refused.value) == ["analysis.result.score"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"a": "\\ud800"}', "surrogate"),
        ('{"a": "x\\u0000"}', "NUL"),
        ("[" * 40 + "]" * 40, "deep"),
    ],
)
async def test_features_json_that_later_reads_could_not_hold_is_refused(
    any_server: RunningServer, text: str, why: str
) -> None:
    parent = await new_org(any_server)
    text = text if text.startswith("{") else json.dumps({"a": json.loads(text)})
    with pytest.raises(InvalidArgument) as refused:
        await any_server.admin().predictions.CreatePrediction(
            ppb.CreatePredictionRequest(
                parent=parent,
                prediction=ppb.Prediction(
                    subject_id="s", model_version="v1", probability=0.5, features_json=text
                ),
            )
        )
    assert fields(refused.value) == ["prediction.features_json"], why


async def test_durations_outside_the_protobuf_range_are_refused(any_server: RunningServer) -> None:
    parent = await new_org(any_server)
    beyond = duration_pb2.Duration(seconds=input_boundary.DURATION_MAX_SECONDS + 1)
    mixed_signs = duration_pb2.Duration(seconds=5, nanos=-1)
    for duration in (beyond, mixed_signs):
        with pytest.raises(InvalidArgument) as refused:
            await any_server.admin().predictions.PurgePredictions(
                ppb.PurgePredictionsRequest(parent=parent, older_than=duration)
            )
        assert fields(refused.value) == ["older_than"]


@pytest.mark.parametrize("etag", ['W/"²"', "²", 'W/"2147483648"', "9" * 40])
async def test_etags_that_no_version_can_have_are_invalid_argument(
    any_server: RunningServer, etag: str
) -> None:
    parent = await new_org(any_server)
    with pytest.raises(InvalidArgument) as refused:
        await any_server.admin().users.DeleteOrganization(
            upb.DeleteOrganizationRequest(name=parent, etag=etag)
        )
    assert fields(refused.value) == ["etag"]


def _token(**claims: Any) -> str:
    body = {"sub": "svc", "org": "*", "scope": "read write", "exp": int(time.time()) + 600}
    body.update(claims)
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"org": "not-a-uuid"},
        {"org": "../*"},
        {"sub": "svc\x00admin"},
        {"sub": "svc\ud800"},
        {"sub": "s" * 256},
    ],
    ids=["org-not-uuid", "org-path", "sub-nul", "sub-surrogate", "sub-over-long"],
)
async def test_claims_that_cannot_be_recorded_are_unauthenticated(
    any_server: RunningServer, claims: dict[str, str]
) -> None:
    client = any_server.client(_token(**claims))
    with pytest.raises(Unauthenticated):
        await client.users.ListOrganizations(upb.ListOrganizationsRequest())
