"""record_factory (db/repositories/base.py): the point reads' records, built without the
frozen dataclass ``__init__``, are the records ``__init__`` builds, in every way a caller
can tell; classes it could not build faithfully are refused at once."""

from __future__ import annotations

import dataclasses
import pickle
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from db.models import (
    AnalysisState,
    AnalysisType,
    AuthProvider,
    OptimizationTier,
    RiskLevel,
    UserRole,
    UserStatus,
)
from db.repositories.analyses import AnalysisRecord
from db.repositories.base import record_factory
from db.repositories.organizations import OrganizationRecord
from db.repositories.predictions import PredictionValues
from db.repositories.users import ProfileRecord, UserRecord

NOW = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

#: A value of each field's kind, by field name (every record read's fields).
SAMPLES: dict[str, Any] = {
    "id": uuid.uuid4(),
    "organization_id": uuid.uuid4(),
    "batch_id": uuid.uuid4(),
    "role": UserRole.ADMIN,
    "status": UserStatus.SUSPENDED,
    "auth_provider": AuthProvider.GITHUB,
    "analysis_type": AnalysisType.EMOTION,
    "optimization_tier": OptimizationTier.FAST,
    "state": AnalysisState.COMPLETED,
    "risk_level": RiskLevel.HIGH,
    "probability": 0.25,
    "sentiment_score": 0.5,
    "quality_score": None,
    "processing_ms": 12.5,
    "emotion_scores": {"joy": 0.75},
    "result": {"k": [1, 2]},
    "features": {"f": 1},
    "version": 3,
    "commit_seq": 41,
}


def _value(field: dataclasses.Field[Any]) -> Any:
    if field.name in SAMPLES:
        return SAMPLES[field.name]
    if field.name.endswith("_time"):
        return NOW
    return f"{field.name} value"


def _hash(instance: Any) -> int | str:
    """The hash, or the error hashing raised (records holding a dict have none)."""
    try:
        return hash(instance)
    except TypeError as exc:
        return str(exc)


RECORDS = [UserRecord, ProfileRecord, OrganizationRecord, AnalysisRecord, PredictionValues]


@pytest.mark.parametrize("record", RECORDS, ids=[r.__name__ for r in RECORDS])
def test_a_built_record_is_the_record_init_builds(record: type[Any]) -> None:
    values = [_value(f) for f in dataclasses.fields(record)]
    expected, built = record(*values), record_factory(record)(*values)
    assert type(built) is record
    assert built == expected
    assert _hash(built) == _hash(expected)
    assert repr(built) == repr(expected)
    assert dataclasses.astuple(built) == dataclasses.astuple(expected)
    assert pickle.loads(pickle.dumps(built)) == expected
    assert dataclasses.replace(built) == expected
    first = dataclasses.fields(record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, first, None)
    assert not hasattr(built, "__dict__")


def test_a_field_default_applies_as_under_init() -> None:
    fields = dataclasses.fields(PredictionValues)
    values = [_value(f) for f in fields if f.default is dataclasses.MISSING]
    built = record_factory(PredictionValues)(*values)
    assert built == PredictionValues(*values) and built.commit_seq is None


@dataclass(slots=True)
class _Mutable:
    a: int


@dataclass(frozen=True)
class _NoSlots:
    a: int


@dataclass(frozen=True, slots=True)
class _Checked:
    a: int

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError("negative")


@dataclass(frozen=True, slots=True)
class _Derived:
    a: int
    b: int = dataclasses.field(init=False, default=0)


@pytest.mark.parametrize("record", [_Mutable, _NoSlots, _Checked, _Derived, int])
def test_classes_it_cannot_build_faithfully_are_refused(record: type[Any]) -> None:
    with pytest.raises(TypeError):
        record_factory(record)
