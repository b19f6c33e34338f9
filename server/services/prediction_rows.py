"""Prediction rows: proto -> validated insert values, and ORM/values -> proto.

Shared by every write path (CreatePrediction, BatchCreatePredictions and the
StreamPredictions ingest), so a row is accepted or refused by the same rules whichever
way it arrives. Validation never raises for a bad row: it returns the violations, so
the unary paths can fail the call and the stream can reject just that row.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2

from db.errors import FieldViolation
from db.models import Prediction, RiskLevel
from db.repositories.prediction_ingest import StagedRow
from db.repositories.predictions import PredictionValues
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1.common_pb2 import FieldViolation as FieldViolationProto
from server.convert import enum_numbers, set_timestamp
from server.input_boundary import (
    MAX_NESTING,
    NOT_FINITE,
    TOO_DEEP,
    column_limit,
    json_problem,
    text_problem,
)

# The columns' lengths (the contract says 128, 50 and 200).
SUBJECT_ID_MAX = column_limit(Prediction.subject_id) or 128
MODEL_VERSION_MAX = column_limit(Prediction.model_version) or 50
MODEL_NAME_MAX = column_limit(Prediction.model_name) or 200
FEATURES_MAX_BYTES = 64 * 1024
LOW_BELOW = 0.3
MEDIUM_BELOW = 0.7

# Stable reasons (common.proto FieldViolation.reason).
REQUIRED = "REQUIRED"
OUT_OF_RANGE = "OUT_OF_RANGE"
INVALID_FORMAT = "INVALID_FORMAT"
TOO_LONG = "TOO_LONG"

_RISK_BY_NUMBER: dict[int, RiskLevel] = {
    pb.RISK_LEVEL_LOW: RiskLevel.LOW,
    pb.RISK_LEVEL_MEDIUM: RiskLevel.MEDIUM,
    pb.RISK_LEVEL_HIGH: RiskLevel.HIGH,
}


@dataclass(frozen=True, slots=True)
class RowViolation:
    """One problem with one row; ``field`` is relative to the Prediction message."""

    field: str
    description: str
    reason: str

    def to_proto(self) -> FieldViolationProto:
        return FieldViolationProto(
            field=self.field, description=self.description, reason=self.reason
        )

    def prefixed(self, prefix: str) -> FieldViolation:
        """As a BadRequest violation under ``prefix`` (e.g. ``requests[3].prediction``)."""
        return FieldViolation(f"{prefix}.{self.field}" if prefix else self.field, self.description)


def derive_risk_level(probability: float) -> RiskLevel:
    """The contract's bands: < 0.3 LOW, < 0.7 MEDIUM, otherwise HIGH."""
    if probability < LOW_BELOW:
        return RiskLevel.LOW
    if probability < MEDIUM_BELOW:
        return RiskLevel.MEDIUM
    return RiskLevel.HIGH


def _check_text(
    value: str, field: str, maximum: int, *, required: bool, violations: list[RowViolation]
) -> None:
    if not value:
        if required:
            violations.append(RowViolation(field, "required", REQUIRED))
        return
    if len(value) > maximum:
        violations.append(RowViolation(field, f"at most {maximum} characters", TOO_LONG))
    elif not value.isascii() or "\x00" in value:
        # The input boundary's text rule; stream rows are refused one by one, so here.
        problem = text_problem(value, None)
        if problem:
            violations.append(RowViolation(field, problem, INVALID_FORMAT))


# --- features ------------------------------------------------------------------------
# The walk below runs for every row of every ingest path, so it is written for speed:
# the field path of a value is only built when that value is refused.


def _refused(violations: list[RowViolation], path: str, key: str | int, description: str) -> None:
    where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
    violations.append(RowViolation(where, description, INVALID_FORMAT))


def _value_to_python(
    value: struct_pb2.Value,
    path: str,
    key: str | int,
    violations: list[RowViolation],
    depth: int,
) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        text = value.string_value
        if "\x00" in text:
            _refused(violations, path, key, "must not contain the NUL character")
        return text
    if kind == "number_value":
        number = value.number_value
        if number.is_integer():
            # Integral numbers read back as JSON integers, as json_format does.
            return int(number) if -(2**53) < number < 2**53 else number
        if not math.isfinite(number):
            _refused(violations, path, key, NOT_FINITE)
            return None
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value" or kind == "list_value":
        if depth >= MAX_NESTING:
            _refused(violations, path, key, TOO_DEEP)
            return None
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
        if kind == "struct_value":
            return _struct_to_python(value.struct_value, where, violations, depth + 1)
        return [
            _value_to_python(item, where, i, violations, depth + 1)
            for i, item in enumerate(value.list_value.values)
        ]
    return None  # null_value or unset


def _struct_to_python(
    struct: struct_pb2.Struct, path: str, violations: list[RowViolation], depth: int = 1
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, item in struct.fields.items():
        if "\x00" in key:
            _refused(violations, path, key, "keys must not contain the NUL character")
        result[key] = _value_to_python(item, path, key, violations, depth)
    return result


def features_to_dict(
    features: struct_pb2.Struct, violations: list[RowViolation]
) -> dict[str, Any] | None:
    """The Struct as plain JSON values (None when empty); non-finite numbers are refused
    because JSON (and PostgreSQL's jsonb) cannot hold them, and so is NUL in text."""
    if not features.fields:
        return None
    if features.ByteSize() > FEATURES_MAX_BYTES:
        violations.append(
            RowViolation("features", f"at most {FEATURES_MAX_BYTES} bytes serialized", TOO_LONG)
        )
        return None
    return _struct_to_python(features, "features", violations)


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NotJson("numbers must be finite")
    return number


_decode_json = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float).decode


def features_json_to_dict(text: str, violations: list[RowViolation]) -> dict[str, Any] | None:
    """``features_json`` parsed (None when empty), or None with a violation."""
    if not text:
        return None
    if len(text) > FEATURES_MAX_BYTES // 4 and len(text.encode()) > FEATURES_MAX_BYTES:
        violations.append(
            RowViolation("features_json", f"at most {FEATURES_MAX_BYTES} bytes", TOO_LONG)
        )
        return None
    try:
        value = _decode_json(text)
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, _NotJson) else "not valid JSON"
        violations.append(RowViolation("features_json", reason, INVALID_FORMAT))
        return None
    if not isinstance(value, dict):
        violations.append(RowViolation("features_json", "must be a JSON object", INVALID_FORMAT))
        return None
    # The input boundary's rules for JSON (U+0000, which jsonb cannot store; lone surrogate
    # escapes; nesting): each needs an escape or many brackets, so only then look closer.
    if "\\u" in text or text.count("{") + text.count("[") > MAX_NESTING:
        problem = json_problem(value, "$")
        if problem is not None:
            # The field stays features_json (one text field); where in the JSON is told.
            description = f"{problem.description} (at {problem.field})"
            violations.append(RowViolation("features_json", description, INVALID_FORMAT))
            return None
    return value if value else None


# --- timestamps ----------------------------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Timestamp's valid range (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z).
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def timestamp_to_datetime(seconds: int, nanos: int) -> datetime | None:
    """Timestamp fields as an aware UTC datetime (microsecond precision, truncated like
    ``Timestamp.ToDatetime``), or None when out of range, without ToDatetime's per-call
    checks and conversions (every streamed row carries a timestamp)."""
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        return None
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


# --- rows ----------------------------------------------------------------------------
def _check_row(
    message: pb.Prediction, now: datetime, violations: list[RowViolation]
) -> tuple[RiskLevel | None, datetime, dict[str, Any] | None]:
    """Every check of one row; (explicit risk level, predict time, features)."""
    _check_text(
        message.subject_id, "subject_id", SUBJECT_ID_MAX, required=True, violations=violations
    )
    _check_text(
        message.model_version,
        "model_version",
        MODEL_VERSION_MAX,
        required=True,
        violations=violations,
    )
    _check_text(
        message.model_name, "model_name", MODEL_NAME_MAX, required=False, violations=violations
    )
    probability = message.probability
    if not 0.0 <= probability <= 1.0:  # NaN compares false too
        violations.append(RowViolation("probability", "must be within [0, 1]", OUT_OF_RANGE))
    risk_level: RiskLevel | None = None
    if message.risk_level:
        risk_level = _RISK_BY_NUMBER.get(message.risk_level)
        if risk_level is None:
            violations.append(
                RowViolation("risk_level", f"unknown value {message.risk_level}", INVALID_FORMAT)
            )
    predict_time = now
    if message.HasField("predict_time"):
        stamp = message.predict_time
        when = timestamp_to_datetime(stamp.seconds, stamp.nanos)
        if when is None:
            violations.append(RowViolation("predict_time", "not a valid timestamp", INVALID_FORMAT))
        else:
            predict_time = when
    text = message.features_json
    if text:
        if message.HasField("features") and message.features.fields:
            violations.append(
                RowViolation(
                    "features_json", "set features or features_json, not both", INVALID_FORMAT
                )
            )
            return risk_level, predict_time, None
        return risk_level, predict_time, features_json_to_dict(text, violations)
    return risk_level, predict_time, features_to_dict(message.features, violations)


def validate_prediction(
    message: pb.Prediction,
    *,
    organization_id: uuid.UUID,
    prediction_id: uuid.UUID,
    request_id: str | None,
    create_by: str | None,
    now: datetime | None = None,
) -> PredictionValues | list[RowViolation]:
    """Validate one row; the insert values, or every violation found (never raises).

    ``name`` and the output-only fields of ``message`` are ignored: the caller decides
    the id (``prediction_id``) and the provenance (``request_id``, ``create_by``).
    ``now`` stamps ``create_time`` and is the default ``predict_time``.
    """
    violations: list[RowViolation] = []
    now = now or datetime.now(UTC)
    risk_level, predict_time, features = _check_row(message, now, violations)
    if violations:
        return violations
    probability = message.probability
    return PredictionValues(
        id=prediction_id,
        organization_id=organization_id,
        subject_id=message.subject_id,
        probability=probability,
        risk_level=risk_level or derive_risk_level(probability),
        model_name=message.model_name,
        model_version=message.model_version,
        features=features,
        predict_time=predict_time,
        request_id=request_id,
        create_time=now,
        create_by=create_by,
    )


#: Compact JSON for jsonb (the features are finite: validation refuses NaN/Infinity).
_JSON = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"))


def validate_staged_row(
    message: pb.Prediction, prediction_id: uuid.UUID, batch_id: str, now: datetime
) -> StagedRow | list[RowViolation]:
    """The stream's form of :func:`validate_prediction`: the staging tuple (features as
    JSON text, passed through unchanged when it came as ``features_json``)."""
    violations: list[RowViolation] = []
    risk_level, predict_time, features = _check_row(message, now, violations)
    if violations:
        return violations
    probability = message.probability
    text = None if features is None else message.features_json or _JSON.encode(features)
    return (
        prediction_id,
        message.subject_id,
        probability,
        (risk_level or derive_risk_level(probability)).value,
        message.model_name,
        message.model_version,
        text,
        predict_time,
        batch_id,
    )


# Built once: see enum_numbers.
_RISK_LEVELS = enum_numbers(pb.RiskLevel, RiskLevel)


def prediction_name(organization_id: uuid.UUID, prediction_id: uuid.UUID) -> str:
    return f"organizations/{organization_id}/predictions/{prediction_id}"


def _fill(
    message: pb.Prediction,
    *,
    organization_id: uuid.UUID,
    prediction_id: uuid.UUID,
    subject_id: str,
    probability: float,
    risk_level: RiskLevel,
    model_name: str,
    model_version: str,
    features: dict[str, Any] | None,
    predict_time: datetime,
    request_id: str | None,
    create_time: datetime,
    create_by: str | None,
) -> pb.Prediction:
    message.name = prediction_name(organization_id, prediction_id)
    message.subject_id = subject_id
    message.probability = probability
    message.risk_level = _RISK_LEVELS[risk_level]
    message.model_name = model_name or ""
    message.model_version = model_version
    if features:
        message.features.update(features)
    set_timestamp(message.predict_time, predict_time)
    message.request_id = request_id or ""
    set_timestamp(message.create_time, create_time)
    message.create_by = create_by or ""
    return message


def values_to_proto(values: PredictionValues) -> pb.Prediction:
    """The resource as stored from ``values`` (no read-back needed after the insert)."""
    return _fill(
        pb.Prediction(),
        organization_id=values.organization_id,
        prediction_id=values.id,
        subject_id=values.subject_id,
        probability=values.probability,
        risk_level=values.risk_level,
        model_name=values.model_name,
        model_version=values.model_version,
        features=values.features,
        predict_time=values.predict_time,
        request_id=values.request_id,
        create_time=values.create_time,
        create_by=values.create_by,
    )


def prediction_to_proto(row: Prediction) -> pb.Prediction:
    return _fill(
        pb.Prediction(),
        organization_id=row.organization_id,
        prediction_id=row.id,
        subject_id=row.subject_id,
        probability=row.probability,
        risk_level=row.risk_level,
        model_name=row.model_name,
        model_version=row.model_version,
        features=row.features,
        predict_time=row.predict_time,
        request_id=row.request_id,
        create_time=row.create_time,
        create_by=row.create_by,
    )
