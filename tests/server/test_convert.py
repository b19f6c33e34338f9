"""The shared conversions: the fast paths give exactly what protobuf's own helpers give."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from db.models import RiskLevel, TextAnalysis, UserRole
from db.models.enums import AnalysisState, AnalysisType, OptimizationTier
from db.repositories.batches import BatchState
from db.repositories.predictions import PredictionValues
from ferrule.v1 import analysis_service_pb2 as analysis_pb
from ferrule.v1 import prediction_service_pb2 as prediction_pb
from ferrule.v1 import user_service_pb2 as pb
from server import names
from server.convert import enum_from_proto, enum_numbers, enum_to_proto, set_timestamp
from server.services.analysis_convert import analysis_to_proto, batch_state_to_proto
from server.services.prediction_rows import values_to_proto

#: Analysis enum fields: (domain enum, proto enum, value-name prefix).
_ANALYSIS_ENUMS: dict[str, tuple[type[enum.StrEnum], Any, str]] = {
    "analysis_type": (AnalysisType, analysis_pb.AnalysisType, "ANALYSIS_TYPE_"),
    "optimization_tier": (OptimizationTier, analysis_pb.OptimizationTier, "OPTIMIZATION_TIER_"),
    "state": (AnalysisState, analysis_pb.AnalysisState, "ANALYSIS_STATE_"),
}


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),  # before the epoch
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 5, 6, 7, 8, 9, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2024, 5, 6, 7, 8, 9, 1),  # naive: UTC, as FromDatetime takes it
    ],
)
def test_set_timestamp_matches_from_datetime(value: datetime) -> None:
    expected, actual = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    set_timestamp(actual, value)
    assert actual == expected


def test_set_timestamp_leaves_the_field_unset_for_none() -> None:
    message = pb.User()
    set_timestamp(message.delete_time, None)
    assert not message.HasField("delete_time")


def test_enum_numbers_round_trip() -> None:
    for role in UserRole:
        number = enum_to_proto(pb.UserRole, role)
        assert pb.UserRole.Name(pb.UserRole.ValueType(number)) == f"USER_ROLE_{role.value}"
        assert enum_from_proto(pb.UserRole, number, UserRole, "role") is role
    assert enum_to_proto(pb.UserRole, None) == 0


def test_names_format_fills_the_template_in_order() -> None:
    org, user = uuid.uuid4(), uuid.uuid4()
    name = names.USER.format(org, user)
    assert name == f"organizations/{org}/users/{user}"
    assert names.USER.parse(name) == (org, user)


_PATTERNS = {k: v for k, v in vars(names).items() if isinstance(v, names.Pattern)}


@pytest.mark.parametrize("pattern", _PATTERNS.values(), ids=_PATTERNS.keys())
def test_every_pattern_fills_its_placeholders_in_order(pattern: names.Pattern) -> None:
    ids = [uuid.uuid4() for _ in range(pattern.template.count("{"))]
    segments = iter(str(i) for i in ids)
    by_hand = "/".join(
        next(segments) if part.startswith("{") else part for part in pattern.template.split("/")
    )
    assert pattern.format(*ids) == by_hand
    assert pattern.format(*map(str, ids)) == by_hand
    assert pattern.parse(by_hand) == tuple(ids)


def test_a_literal_percent_in_a_template_stays_as_written() -> None:
    pattern = names.Pattern("rates/100%/items/{item}", "test.Item")
    assert pattern.format("x") == "rates/100%/items/x"


# --- every enum field of every converter, against the descriptor by name ---------------
_NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def _analysis(**enums: enum.StrEnum) -> TextAnalysis:
    values: dict[str, Any] = {
        "analysis_type": AnalysisType.SENTIMENT,
        "optimization_tier": OptimizationTier.STANDARD,
        "state": AnalysisState.PENDING,
        **enums,
    }
    return TextAnalysis(
        id=uuid.uuid4(),
        organization_id=uuid.uuid4(),
        text="some text",
        content_hash="0" * 64,
        version=1,
        create_time=_NOW,
        update_time=_NOW,
        **values,
    )


@pytest.mark.parametrize(
    ("field", "member"),
    [(field, m) for field, domain in _ANALYSIS_ENUMS.items() for m in domain[0]],
)
def test_analysis_enum_fields_carry_the_descriptors_numbers(
    field: str, member: enum.StrEnum
) -> None:
    _, proto_enum, prefix = _ANALYSIS_ENUMS[field]
    message = analysis_to_proto(_analysis(**{field: member}))
    assert getattr(message, field) == proto_enum.Value(prefix + member.value)


@pytest.mark.parametrize("state", list(BatchState))
def test_batch_states_carry_the_descriptors_numbers(state: BatchState) -> None:
    assert batch_state_to_proto(state) == analysis_pb.BatchState.Value(f"BATCH_STATE_{state.value}")


@pytest.mark.parametrize("risk", list(RiskLevel))
def test_risk_levels_carry_the_descriptors_numbers(risk: RiskLevel) -> None:
    values = PredictionValues(
        id=uuid.uuid4(),
        organization_id=uuid.uuid4(),
        subject_id="s",
        probability=0.5,
        risk_level=risk,
        model_name="m",
        model_version="1",
        features=None,
        predict_time=_NOW,
        request_id=None,
        create_time=_NOW,
        create_by=None,
    )
    expected = prediction_pb.RiskLevel.Value(f"RISK_LEVEL_{risk.value}")
    assert values_to_proto(values).risk_level == expected


def test_enum_numbers_is_enum_to_proto_for_every_member_and_none() -> None:
    table = enum_numbers(pb.UserRole, UserRole)
    assert table == {m: enum_to_proto(pb.UserRole, m) for m in [None, *UserRole]}
