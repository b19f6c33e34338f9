"""Domain errors raised by the data layer.

Repositories translate driver and constraint errors into these so that the server maps
them to gRPC status codes in one place (``server/errors.py``) and never leaks SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DomainError(Exception):
    """Base of every error the data layer raises on purpose."""

    #: Stable UPPER_SNAKE reason, sent as ``google.rpc.ErrorInfo.reason``.
    reason: str = "DOMAIN_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(DomainError):
    reason = "RESOURCE_NOT_FOUND"

    def __init__(self, resource_type: str, resource_name: str) -> None:
        super().__init__(f"{resource_type} {resource_name!r} not found")
        self.resource_type = resource_type
        self.resource_name = resource_name


class AlreadyExistsError(DomainError):
    """A unique constraint would be violated (e.g. a live user with the same email)."""

    reason = "RESOURCE_ALREADY_EXISTS"

    def __init__(self, resource_type: str, resource_name: str, message: str | None = None) -> None:
        super().__init__(message or f"{resource_type} {resource_name!r} already exists")
        self.resource_type = resource_type
        self.resource_name = resource_name


class StaleEtagError(DomainError):
    """The caller's etag does not match the stored version (optimistic concurrency)."""

    reason = "ETAG_MISMATCH"

    def __init__(self, resource_name: str) -> None:
        super().__init__(f"etag for {resource_name!r} is stale; read the resource and retry")
        self.resource_name = resource_name


class InvalidTransitionError(DomainError):
    """A state machine refused a change (e.g. COMPLETED -> PENDING)."""

    reason = "INVALID_STATE_TRANSITION"

    def __init__(self, resource_name: str, from_state: str, to_state: str) -> None:
        super().__init__(f"{resource_name!r} cannot go from {from_state} to {to_state}")
        self.resource_name = resource_name
        self.from_state = from_state
        self.to_state = to_state


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class ValidationError(DomainError):
    """Input that breaks a rule the data layer enforces; carries per-field violations."""

    violations: list[FieldViolation] = field(default_factory=list)
    reason = "INVALID_ARGUMENT"

    def __post_init__(self) -> None:
        text = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        DomainError.__init__(self, text or "invalid argument")


class FailedPreconditionError(DomainError):
    """The operation is valid but the resource is not in a state that allows it."""

    reason = "FAILED_PRECONDITION"


class DatabaseUnavailableError(DomainError):
    """The database could not be reached or dropped the connection; safe to retry."""

    reason = "DATABASE_UNAVAILABLE"


class StatementTimeoutError(DomainError):
    """The statement ran past the RPC's remaining deadline and was cancelled."""

    reason = "STATEMENT_TIMEOUT"


class ConcurrentModificationError(DomainError):
    """A concurrent transaction won a race (serialization failure, deadlock, or the same
    request_id committed by a parallel call); retrying the whole call is safe (ABORTED)."""

    reason = "CONCURRENT_MODIFICATION"


class AccessDeniedError(DomainError):
    """The database refused the row (row-level security or privileges): the repository's own
    tenant scoping should have prevented this, so it means a bug or a forged tenant."""

    reason = "ACCESS_DENIED"
