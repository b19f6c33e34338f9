"""features_json (the JSON-text alternative to the features Struct) and the fast
timestamp conversion: same values and same refusals as the Struct path."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from ferrule.v1 import prediction_service_pb2 as pb
from server.services.prediction_rows import (
    RowViolation,
    features_json_to_dict,
    features_to_dict,
    timestamp_to_datetime,
    validate_staged_row,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FEATURES: dict[str, Any] = {
    "tenure": 12,
    "band": "B3",
    "ratio": 0.25,
    "remote": True,
    "tags": ["a", 1],
}


def row(**fields: object) -> pb.Prediction:
    message = pb.Prediction(subject_id="s", probability=0.5, model_version="v1")
    for key, value in fields.items():
        setattr(message, key, value)
    return message


def test_json_and_struct_give_the_same_value() -> None:
    message = pb.Prediction()
    message.features.update(FEATURES)
    violations: list[RowViolation] = []
    assert features_to_dict(message.features, violations) == FEATURES
    assert features_json_to_dict(json.dumps(FEATURES), violations) == FEATURES
    assert violations == []


def test_json_refusals() -> None:
    for text in ('{"a": NaN}', '{"a": 1e999}', "[1, 2]", "{", '{"a": "\\u0000"}'):
        violations: list[RowViolation] = []
        assert features_json_to_dict(text, violations) is None, text
        assert [v.field for v in violations] == ["features_json"], text


def test_staged_row_passes_the_text_through_and_refuses_both_fields() -> None:
    text = json.dumps(FEATURES)
    staged = validate_staged_row(row(features_json=text), uuid.uuid4(), "b-1", NOW)
    assert isinstance(staged, tuple)
    assert staged[6] == text
    both = row(features_json=text)
    both.features.update({"x": 1})
    refused = validate_staged_row(both, uuid.uuid4(), "b-1", NOW)
    assert isinstance(refused, list)
    assert [v.field for v in refused] == ["features_json"]


def test_timestamp_matches_to_datetime() -> None:
    for seconds, nanos in ((0, 0), (1_767_225_600, 999_999_999), (-1, 500), (253_402_300_799, 0)):
        stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
        assert timestamp_to_datetime(seconds, nanos) == stamp.ToDatetime(tzinfo=UTC)
    assert timestamp_to_datetime(253_402_300_800, 0) is None
    assert timestamp_to_datetime(0, -1) is None
