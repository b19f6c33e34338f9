"""Etags (AIP-154) from the row's version column: opaque to clients, cheap to check."""

from __future__ import annotations

from db.errors import FieldViolation, ValidationError

#: The row version is a 32-bit INTEGER column (db.models.base.VersionMixin).
VERSION_MAX = 2**31 - 1


def etag_of(version: int) -> str:
    return f'W/"{version}"'


def expected_version(etag: str, field: str = "etag") -> int | None:
    """The version an etag names; None for an empty etag (no precondition)."""
    if not etag:
        return None
    inner = etag.removeprefix("W/").strip('"')
    # ASCII digits only ("²".isdigit() is true) and within the version column's INTEGER.
    if not (inner.isascii() and inner.isdigit() and len(inner) <= 10 and int(inner) <= VERSION_MAX):
        raise ValidationError([FieldViolation(field, "is not an etag this server issued")])
    return int(inner)
