"""The one error mapper: exceptions -> gRPC status code + google.rpc.Status details (AIP-193).

Every status the server sends carries exactly one ErrorInfo (stable UPPER_SNAKE reason,
domain "ferrule"), plus BadRequest / ResourceInfo / RetryInfo where they help. Unexpected
exceptions become INTERNAL with a generic message; their text never reaches the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from db import errors as db_errors
from server.auth import AuthenticationError
from server.authorization import PermissionDeniedError

DOMAIN = "ferrule"
log = logging.getLogger("ferrule.errors")


class ResourceExhaustedError(Exception):
    """Too much at once (concurrency limit, oversized batch); retry later with backoff."""

    def __init__(
        self,
        message: str,
        retry_after_seconds: float = 1.0,
        *,
        reason: str = "RESOURCE_EXHAUSTED",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.reason = reason
        self.metadata = dict(metadata or {})


@dataclass(frozen=True)
class MappedError:
    code: grpc.StatusCode
    status: status_pb2.Status


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *extra: Message,
    metadata: Mapping[str, str] | None = None,
) -> MappedError:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {}))
    details = [_pack(info), *(_pack(e) for e in extra)]
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return MappedError(code, status)


def bad_request(violations: Sequence[db_errors.FieldViolation]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def map_exception(exc: BaseException) -> MappedError:
    """Translate any exception into the status the caller sees."""
    s = grpc.StatusCode
    match exc:
        case db_errors.ValidationError():
            return _status(s.INVALID_ARGUMENT, exc.message, exc.reason, bad_request(exc.violations))
        case db_errors.NotFoundError():
            resource = error_details_pb2.ResourceInfo(
                resource_type=exc.resource_type,
                resource_name=exc.resource_name,
                description=exc.message,
            )
            return _status(s.NOT_FOUND, exc.message, exc.reason, resource)
        case db_errors.AlreadyExistsError():
            resource = error_details_pb2.ResourceInfo(
                resource_type=exc.resource_type, resource_name=exc.resource_name
            )
            return _status(s.ALREADY_EXISTS, exc.message, exc.reason, resource)
        case db_errors.StaleEtagError() | db_errors.ConcurrentModificationError():
            return _status(s.ABORTED, exc.message, exc.reason)
        case db_errors.InvalidTransitionError():
            return _status(
                s.FAILED_PRECONDITION,
                exc.message,
                exc.reason,
                metadata={"from_state": exc.from_state, "to_state": exc.to_state},
            )
        case db_errors.FailedPreconditionError():
            return _status(s.FAILED_PRECONDITION, exc.message, exc.reason)
        case db_errors.StatementTimeoutError():
            message = "the deadline expired while the query ran"
            return _status(s.DEADLINE_EXCEEDED, message, exc.reason)
        case db_errors.DatabaseUnavailableError():
            return _status(
                s.UNAVAILABLE, "the database is unavailable; retry", exc.reason, retry_info(1.0)
            )
        case db_errors.AccessDeniedError():
            # Row-level security caught what tenant scoping should have: never say more.
            log.error("row-level security refused a statement", exc_info=exc)
            return _status(s.PERMISSION_DENIED, "permission denied", exc.reason)
        case db_errors.DomainError():
            return _status(s.FAILED_PRECONDITION, exc.message, exc.reason)
        case AuthenticationError():
            return _status(s.UNAUTHENTICATED, str(exc), "UNAUTHENTICATED")
        case PermissionDeniedError():
            return _status(s.PERMISSION_DENIED, str(exc), exc.reason)
        case ResourceExhaustedError():
            return _status(
                s.RESOURCE_EXHAUSTED,
                str(exc),
                exc.reason,
                retry_info(exc.retry_after_seconds),
                metadata=exc.metadata,
            )
        case TimeoutError():
            return _status(s.DEADLINE_EXCEEDED, "the deadline expired", "DEADLINE_EXCEEDED")
    log.exception("unexpected error", exc_info=exc)
    return _status(s.INTERNAL, "internal error", "INTERNAL")


async def abort(context: grpc.aio.ServicerContext[object, object], exc: BaseException) -> None:
    """Abort the RPC with the mapped status (raises, as context.abort does)."""
    mapped = map_exception(exc)
    assert mapped.status.code != code_pb2.OK
    await context.abort_with_status(rpc_status.to_status(mapped.status))
