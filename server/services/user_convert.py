"""UserService protobuf <-> domain: resource messages out, validated field values in.

Validation collects every violation of a request before raising, so a caller fixes all
of its mistakes in one round trip; nothing here touches the database.
"""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from urllib.parse import urlsplit

from db.errors import ValidationError
from db.models import (
    AuthProvider,
    Organization,
    User,
    UserProfile,
    UserRole,
    UserSession,
    UserStatus,
)
from db.repositories.users import normalize_email
from ferrule.v1 import user_service_pb2 as pb
from server import names
from server.convert import (
    E,
    ProtoEnum,
    V,
    enum_from_proto,
    enum_numbers,
    enum_to_proto,
    set_timestamp,
)
from server.etags import etag_of
from server.violations import Violations

MAX_DISPLAY_NAME = 200
MAX_FULL_NAME = 200
MAX_BIO = 2000
MAX_AVATAR_URI = 2048
MAX_USER_AGENT = 512
MAX_QUERY = 320
MIN_PASSWORD, MAX_PASSWORD = 8, 256
_USERNAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
# BCP-47 shape (language, then script/region/variant subtags); not a registry lookup.
_LOCALE = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")
_MAX_LOCALE = 35


# --- validation of single fields ---------------------------------------------------
def check_email(v: Violations, value: str, field: str) -> str:
    try:
        return normalize_email(value)
    except ValidationError:
        v.add(field, "required; a valid email address of at most 320 characters")
        return value


def check_username(v: Violations, value: str, field: str) -> None:
    if value and not _USERNAME.fullmatch(value):
        v.add(field, "1 to 100 characters of A-Z, a-z, 0-9, '.', '_' and '-'")


def check_full_name(v: Violations, value: str, field: str) -> None:
    v.check(len(value) <= MAX_FULL_NAME, field, f"at most {MAX_FULL_NAME} characters")


def check_display_name(v: Violations, value: str, field: str) -> None:
    v.check(
        len(value.strip()) > 0 and len(value) <= MAX_DISPLAY_NAME,
        field,
        f"required; 1 to {MAX_DISPLAY_NAME} characters",
    )


def check_password(v: Violations, value: str, field: str) -> None:
    v.check(
        MIN_PASSWORD <= len(value) <= MAX_PASSWORD,
        field,
        f"{MIN_PASSWORD} to {MAX_PASSWORD} characters",
    )


@cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_profile_field(v: Violations, name: str, value: str, field: str) -> None:
    """One UserProfile field; empty always passes (it clears the field)."""
    if not value:
        return
    if name == "bio":
        v.check(len(value) <= MAX_BIO, field, f"at most {MAX_BIO} characters")
    elif name == "avatar_uri":
        parts = urlsplit(value)
        v.check(
            len(value) <= MAX_AVATAR_URI
            and parts.scheme in {"http", "https"}
            and bool(parts.netloc),
            field,
            f"an absolute http(s) URI of at most {MAX_AVATAR_URI} characters",
        )
    elif name == "locale":
        v.check(
            len(value) <= _MAX_LOCALE and _LOCALE.fullmatch(value) is not None,
            field,
            "a BCP-47 language tag such as en-US",
        )
    elif name == "time_zone":
        v.check(value in _time_zones(), field, "an IANA time zone such as Europe/Paris")


PROFILE_FIELDS = ("bio", "avatar_uri", "locale", "time_zone")


def check_profile(v: Violations, profile: pb.UserProfile, prefix: str) -> None:
    for name in PROFILE_FIELDS:
        check_profile_field(v, name, getattr(profile, name), f"{prefix}.{name}")


def check_user_agent(v: Violations, value: str, field: str) -> None:
    v.check(len(value) <= MAX_USER_AGENT, field, f"at most {MAX_USER_AGENT} characters")


def check_ip_address(v: Violations, value: str, field: str) -> None:
    if not value:
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        v.add(field, "an IPv4 or IPv6 address")


def role_from(v: Violations, value: int, field: str, *, required: bool) -> UserRole | None:
    with v.collect():
        return enum_from_proto(pb.UserRole, value, UserRole, field, required=required)
    return None


def status_from(v: Violations, value: int, field: str, *, required: bool) -> UserStatus | None:
    with v.collect():
        return enum_from_proto(pb.UserStatus, value, UserStatus, field, required=required)
    return None


def provider_from(v: Violations, value: int, field: str, *, required: bool) -> AuthProvider | None:
    with v.collect():
        return enum_from_proto(pb.AuthProvider, value, AuthProvider, field, required=required)
    return None


def check_order_by(v: Violations, order_by: str, allowed: tuple[str, ...]) -> None:
    """The contract's sort fields only (the repositories may know more)."""
    for clause in order_by.split(","):
        parts = clause.split()
        if parts and parts[0] not in allowed:
            v.add("order_by", f"unknown field {parts[0]!r}; use one of {', '.join(allowed)}")


def none_if_empty(value: str) -> str | None:
    return value or None


# --- domain -> protobuf --------------------------------------------------------------
def organization_to_proto(row: Organization) -> pb.Organization:
    message = pb.Organization(
        name=names.ORGANIZATION.format(row.id),
        display_name=row.display_name,
        etag=etag_of(row.version),
        create_by=row.create_by or "",
        update_by=row.update_by or "",
        delete_by=row.delete_by or "",
    )
    set_timestamp(message.create_time, row.create_time)
    set_timestamp(message.update_time, row.update_time)
    set_timestamp(message.delete_time, row.delete_time)
    return message


# Built once: see enum_numbers.
_ROLES = enum_numbers(pb.UserRole, UserRole)
_STATUSES = enum_numbers(pb.UserStatus, UserStatus)
_PROVIDERS = enum_numbers(pb.AuthProvider, AuthProvider)


def _fill_profile(target: pb.UserProfile, profile: UserProfile | None) -> None:
    """The profile, present (empty) even for a user without one. Set on the message's
    own sub-message: upb copies a sub-message passed to the constructor."""
    target.SetInParent()
    if profile is not None:
        target.bio = profile.bio or ""
        target.avatar_uri = profile.avatar_uri or ""
        target.locale = profile.locale or ""
        target.time_zone = profile.time_zone or ""


def user_to_proto(row: User) -> pb.User:
    """The user as the API shows it: the password hash becomes only `has_password`."""
    message = pb.User(
        name=names.USER.format(row.organization_id, row.id),
        email=row.email,
        username=row.username,
        full_name=row.full_name or "",
        role=_ROLES[row.role],
        status=_STATUSES[row.status],
        auth_provider=_PROVIDERS[row.auth_provider],
        etag=etag_of(row.version),
        create_by=row.create_by or "",
        update_by=row.update_by or "",
        delete_by=row.delete_by or "",
        has_password=row.password_hash is not None,
    )
    _fill_profile(message.profile, row.profile)
    set_timestamp(message.last_login_time, row.last_login_time)
    set_timestamp(message.create_time, row.create_time)
    set_timestamp(message.update_time, row.update_time)
    set_timestamp(message.delete_time, row.delete_time)
    return message


def session_state(row: UserSession, now: datetime) -> pb.SessionState.ValueType:
    if row.revoke_time is not None:
        return pb.SESSION_STATE_REVOKED
    if now >= row.expire_time:
        return pb.SESSION_STATE_EXPIRED
    return pb.SESSION_STATE_ACTIVE


def session_to_proto(row: UserSession, now: datetime, token: str = "") -> pb.UserSession:
    """The session; `token` only from CreateUserSession (it is never stored)."""
    message = pb.UserSession(
        name=names.USER_SESSION.format(row.organization_id, row.user_id, row.id),
        session_token=token,
        state=session_state(row, now),
        user_agent=row.user_agent or "",
        ip_address=row.peer or "",
        create_by=row.create_by or "",
        revoke_by=row.revoke_by or "",
    )
    set_timestamp(message.expire_time, row.expire_time)
    set_timestamp(message.create_time, row.create_time)
    set_timestamp(message.revoke_time, row.revoke_time)
    return message


def counts_in_enum_order(proto_enum: ProtoEnum[V], counts: Mapping[E, int]) -> list[tuple[V, int]]:
    """(proto number, count) for the non-zero counts, in the enum's declaration order."""
    return sorted((enum_to_proto(proto_enum, k), c) for k, c in counts.items() if c)
