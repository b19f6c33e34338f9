"""The exact User a record converts to: every field, for every enum value, with and
without a profile, live and deleted, from the point-read record and from the ORM row.

The expected message is built field by field through protobuf's own helpers (enum
numbers looked up by name in the descriptor, ``Timestamp.FromDatetime``, the name
spelled out), so a wrong precomputed table or a fast path that drifts fails here."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from db.models import AuthProvider, User, UserProfile, UserRole, UserStatus
from db.repositories.users import ProfileRecord, UserRecord
from ferrule.v1 import user_service_pb2 as pb
from server.services.user_convert import user_to_proto

ORG = uuid.UUID("0190b6a4-1c2d-7e3f-8a9b-0c1d2e3f4a5b")
USER = uuid.UUID("0190b6a4-1c2d-7e3f-8a9b-0c1d2e3f4a5c")
CREATED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
UPDATED = datetime(2024, 6, 7, 8, 9, 10, 1, tzinfo=UTC)
LOGGED_IN = datetime(2024, 6, 7, 8, 0, 0, tzinfo=UTC)
DELETED = datetime(2024, 7, 1, tzinfo=UTC)
FULL_PROFILE = ProfileRecord(
    bio="A bio", avatar_uri="https://example.com/a.png", locale="en-GB", time_zone="Europe/Paris"
)
PARTIAL_PROFILE = ProfileRecord(bio=None, avatar_uri=None, locale="fr", time_zone=None)

BASE = UserRecord(
    profile=FULL_PROFILE,
    id=USER,
    organization_id=ORG,
    email="ada@example.com",
    username="ada",
    full_name="Ada Lovelace",
    role=UserRole.MEMBER,
    status=UserStatus.ACTIVE,
    auth_provider=AuthProvider.EMAIL,
    password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
    last_login_time=LOGGED_IN,
    create_time=CREATED,
    update_time=UPDATED,
    delete_time=None,
    create_by="users/creator",
    update_by="users/updater",
    delete_by=None,
    version=7,
)


def _variants() -> list[Any]:
    cases: list[Any] = []
    for field, domain in (
        ("role", UserRole),
        ("status", UserStatus),
        ("auth_provider", AuthProvider),
    ):
        for member in domain:
            changes: dict[str, Any] = {field: member}
            record = dataclasses.replace(BASE, **changes)
            cases.append(pytest.param(record, id=f"{field}-{member.value}"))
    cases += [
        pytest.param(dataclasses.replace(BASE, profile=None), id="no-profile"),
        pytest.param(dataclasses.replace(BASE, profile=PARTIAL_PROFILE), id="partial-profile"),
        pytest.param(
            dataclasses.replace(
                BASE,
                full_name=None,
                password_hash=None,
                auth_provider=AuthProvider.GOOGLE,
                last_login_time=None,
                create_by=None,
                update_by=None,
            ),
            id="sparse",
        ),
        pytest.param(
            dataclasses.replace(BASE, delete_time=DELETED, delete_by="users/deleter", version=9),
            id="deleted",
        ),
    ]
    return cases


def _expected(record: UserRecord) -> pb.User:
    message = pb.User()
    message.name = f"organizations/{record.organization_id}/users/{record.id}"
    message.email = record.email
    message.username = record.username
    message.full_name = record.full_name or ""
    message.role = pb.UserRole.Value(f"USER_ROLE_{record.role.value}")
    message.status = pb.UserStatus.Value(f"USER_STATUS_{record.status.value}")
    message.auth_provider = pb.AuthProvider.Value(f"AUTH_PROVIDER_{record.auth_provider.value}")
    message.profile.SetInParent()
    if record.profile is not None:
        message.profile.bio = record.profile.bio or ""
        message.profile.avatar_uri = record.profile.avatar_uri or ""
        message.profile.locale = record.profile.locale or ""
        message.profile.time_zone = record.profile.time_zone or ""
    message.etag = f'W/"{record.version}"'
    message.create_by = record.create_by or ""
    message.update_by = record.update_by or ""
    message.delete_by = record.delete_by or ""
    message.has_password = record.password_hash is not None
    for field in ("last_login_time", "create_time", "update_time", "delete_time"):
        value = getattr(record, field)
        if value is not None:
            getattr(message, field).FromDatetime(value)
    return message


def _orm_user(record: UserRecord) -> User:
    """The same user as a (transient) ORM row, as the session reads convert it."""
    columns = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    profile = columns.pop("profile")
    user = User(**columns)
    if profile is not None:
        user.profile = UserProfile(
            user_id=record.id,
            organization_id=record.organization_id,
            **dataclasses.asdict(profile),
        )
    return user


@pytest.mark.parametrize("record", _variants())
@pytest.mark.parametrize("shape", ["record", "orm"])
def test_user_to_proto_gives_exactly_the_user(record: UserRecord, shape: str) -> None:
    # The cached Get converts the record as a User (server/services/user_service.py).
    row = _orm_user(record) if shape == "orm" else cast(User, record)
    actual = user_to_proto(row)
    expected = _expected(record)
    assert actual == expected
    assert actual.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )
    # Presence, which equality on empty sub-messages would not show.
    present = {field.name for field, _ in actual.ListFields()}
    assert "profile" in present
    assert ("delete_time" in present) == (record.delete_time is not None)
    assert ("last_login_time" in present) == (record.last_login_time is not None)
