"""Collecting every field violation of a request, so the caller hears about all at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from db.errors import FieldViolation, ValidationError

T = TypeVar("T")


class Violations:
    """Collects field violations across a whole request; `raise_if_any` raises them together."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def extend(self, violations: list[FieldViolation]) -> None:
        self.items.extend(violations)

    def check(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.add(field, description)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Record a ValidationError raised in the block instead of propagating it."""
        try:
            yield
        except ValidationError as exc:
            self.items.extend(exc.violations)

    def call(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None with its violations recorded."""
        try:
            return fn()
        except ValidationError as exc:
            self.items.extend(exc.violations)
            return None

    def raise_if_any(self) -> None:
        if self.items:
            raise ValidationError(list(self.items))
