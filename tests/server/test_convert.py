"""The shared conversions: the fast paths give exactly what protobuf's own helpers give."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from db.models import UserRole
from ferrule.v1 import user_service_pb2 as pb
from server import names
from server.convert import enum_from_proto, enum_to_proto, set_timestamp


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
