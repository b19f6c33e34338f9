"""Protobuf <-> Python value conversions shared by every servicer."""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.json_format import MessageToDict

from db.errors import FieldViolation, ValidationError

E = TypeVar("E", bound=enum.StrEnum)
V = TypeVar("V", bound=int)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    """``Timestamp.FromDatetime`` for aware datetimes, by integer arithmetic (every
    response carries several timestamps); naive ones are taken as UTC, as it does."""
    if value is None:
        return
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def to_datetime(value: timestamp_pb2.Timestamp, path: str) -> datetime:
    """An aware datetime; INVALID_ARGUMENT naming `path` outside years 1..9999."""
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValidationError(
            [FieldViolation(path, "not a valid timestamp (years 1 to 9999)")]
        ) from None


def optional_datetime(message: Any, field: str, path: str | None = None) -> datetime | None:
    """The Timestamp `field` of `message` as an aware datetime, or None when unset.

    `path` is the field's full path in the request, for the error (default: `field`).
    """
    if not message.HasField(field):
        return None
    return to_datetime(getattr(message, field), path or field)


def time_range(
    value: Any, path: str, *, misordered_path: str | None = None
) -> tuple[datetime | None, datetime | None]:
    """A ferrule.v1.TimeRange as a half-open [start, end); either bound may be unset.

    INVALID_ARGUMENT (every problem at once) for a bound out of range or end before start;
    the latter is reported on `misordered_path` (default: the range's end_time).
    """
    violations: list[FieldViolation] = []
    bounds: list[datetime | None] = []
    for part in ("start_time", "end_time"):
        try:
            bounds.append(optional_datetime(value, part, f"{path}.{part}"))
        except ValidationError as exc:
            violations.extend(exc.violations)
            bounds.append(None)
    start, end = bounds
    if start is not None and end is not None and end < start:
        violations.append(
            FieldViolation(misordered_path or f"{path}.end_time", "must not be before start_time")
        )
    if violations:
        raise ValidationError(violations)
    return start, end


def to_timedelta(value: duration_pb2.Duration, path: str) -> timedelta:
    """A timedelta; INVALID_ARGUMENT naming `path` beyond what a timedelta holds."""
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise ValidationError([FieldViolation(path, "duration out of range")]) from None


def set_duration_ms(target: duration_pb2.Duration, milliseconds: float | None) -> None:
    if milliseconds is not None:
        target.FromTimedelta(timedelta(milliseconds=milliseconds))


def duration_ms(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e6


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return MessageToDict(value)


class ProtoEnum(Protocol[V]):
    """A generated protobuf enum (``pb.UserRole``): its numbers typed as the enum's values."""

    DESCRIPTOR: EnumDescriptor

    def Name(self, number: V) -> str: ...

    def Value(self, name: str) -> V: ...

    def __hash__(self) -> int: ...


def enum_from_proto(
    proto_enum: ProtoEnum[V], value: int, domain: type[E], field: str, *, required: bool = True
) -> E | None:
    """Map a proto enum number to the domain StrEnum by name (prefix stripped).

    Unknown numbers and the *_UNSPECIFIED zero value are INVALID_ARGUMENT when the field
    is required, and None otherwise.
    """
    if value == 0:
        if required:
            raise ValidationError([FieldViolation(field, "required")])
        return None
    known = proto_enum.DESCRIPTOR.values_by_number.get(value)
    if known is None:
        raise ValidationError([FieldViolation(field, f"unknown value {value}")])
    try:
        return domain(known.name.removeprefix(_enum_prefix(proto_enum)))
    except ValueError:
        raise ValidationError([FieldViolation(field, f"unsupported value {known.name}")]) from None


def enum_to_proto(proto_enum: ProtoEnum[V], value: enum.StrEnum | None) -> V:
    """The proto enum's number for a domain value (the *_UNSPECIFIED zero for None)."""
    if value is None:
        return proto_enum.Value(proto_enum.DESCRIPTOR.values_by_number[0].name)
    return proto_enum.Value(_enum_prefix(proto_enum) + value.value)


def enum_numbers(proto_enum: ProtoEnum[V], domain: type[E]) -> Mapping[E | None, V]:
    """Every member of ``domain``, and None, to its :func:`enum_to_proto` number.

    Converters look their enum fields up in these tables, built once at import, instead
    of calling :func:`enum_to_proto` per field: each call pays a descriptor ``Value``
    lookup by name, the bulk of an enum field's conversion cost on the hot read path.
    Built from :func:`enum_to_proto` itself, so the two can never disagree; a member the
    proto enum lacks fails here, at import, rather than on the first response."""
    numbers: dict[E | None, V] = {None: enum_to_proto(proto_enum, None)}
    for member in domain:
        numbers[member] = enum_to_proto(proto_enum, member)
    return numbers


@functools.cache
def _enum_prefix(proto_enum: ProtoEnum[V]) -> str:
    """`RISK_LEVEL_` for enum RiskLevel: buf's ENUM_VALUE_PREFIX convention (remembered
    per enum: every response converts its enums, and the descriptor lookup costs more
    than the rest of the conversion)."""
    zero: str = proto_enum.DESCRIPTOR.values_by_number[0].name
    return zero.removesuffix("UNSPECIFIED")
