"""Etags (AIP-154) from the row's version column: opaque to clients, cheap to check."""

from __future__ import annotations

from db.errors import FieldViolation, ValidationError


def etag_of(version: int) -> str:
    return f'W/"{version}"'


def expected_version(etag: str, field: str = "etag") -> int | None:
    """The version an etag names; None for an empty etag (no precondition)."""
    if not etag:
        return None
    inner = etag.removeprefix("W/").strip('"')
    if not inner.isdigit():
        raise ValidationError([FieldViolation(field, "is not an etag this server issued")])
    return int(inner)
