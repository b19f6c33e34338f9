"""Typed exceptions built from the rich ``google.rpc.Status`` an RPC failed with (AIP-193).

Ferrule puts a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer of every
error: one ``ErrorInfo`` (stable reason, domain ``ferrule``), ``BadRequest`` field
violations for INVALID_ARGUMENT, ``ResourceInfo`` for NOT_FOUND and ``RetryInfo`` where
retrying helps. :func:`from_rpc_error` turns a ``grpc.RpcError`` (sync or asyncio) into
the subclass of :class:`FerruleError` for its status code, with those details parsed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FerruleError",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
]

_M = TypeVar("_M", bound=Message)

FieldViolation = tuple[str, str]
"""``(field, description)`` of one ``google.rpc.BadRequest.FieldViolation``."""

# The detail types of google/rpc/error_details.proto, unpacked from ``Any`` when present.
_KNOWN_DETAILS: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.DebugInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)


def _unpack(detail: any_pb2.Any) -> Message:
    """The detail as its concrete message type, or the ``Any`` itself when unknown."""
    for message_type in _KNOWN_DETAILS:
        if detail.TypeName() == message_type.DESCRIPTOR.full_name:
            message = message_type()
            try:
                if detail.Unpack(message):
                    return message
            except DecodeError:
                return detail
    return detail


class FerruleError(Exception):
    """A failed Ferrule RPC, with the rich error details the server sent.

    Attributes:
        code: the gRPC status code.
        message: the developer-facing message (``google.rpc.Status.message``).
        reason: ``ErrorInfo.reason``, a stable UPPER_SNAKE identifier ("" if absent).
        domain: ``ErrorInfo.domain`` ("ferrule" for the server's own errors).
        metadata: ``ErrorInfo.metadata``, extra structured facts about the error.
        details: every detail of the status, unpacked to its ``google.rpc`` type when
            known (``google.protobuf.Any`` otherwise).
        status: the whole ``google.rpc.Status``, or None when the server sent none.
        trailing_metadata: the call's trailing metadata as ``(key, value)`` pairs.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: Sequence[Message] = (),
        status: status_pb2.Status | None = None,
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details: tuple[Message, ...] = tuple(details)
        self.status = status
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = tuple(trailing_metadata)
        info = self.detail(error_details_pb2.ErrorInfo)
        self.reason: str = info.reason if info is not None else ""
        self.domain: str = info.domain if info is not None else ""
        self.metadata: Mapping[str, str] = dict(info.metadata) if info is not None else {}

    def detail(self, message_type: type[_M]) -> _M | None:
        """The first detail of ``message_type``, or None."""
        for detail in self.details:
            if isinstance(detail, message_type):
                return detail
        return None

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code.name}, reason={self.reason!r}, message={self.message!r})"


class Cancelled(FerruleError):
    code = grpc.StatusCode.CANCELLED


class Unknown(FerruleError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(FerruleError):
    """The request is malformed; ``field_violations`` says which fields and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field_violations(self) -> list[FieldViolation]:
        bad_request = self.detail(error_details_pb2.BadRequest)
        if bad_request is None:
            return []
        return [(v.field, v.description) for v in bad_request.field_violations]


class DeadlineExceeded(FerruleError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(FerruleError):
    """The named resource does not exist (or is not visible to the caller)."""

    code = grpc.StatusCode.NOT_FOUND

    @property
    def resource_type(self) -> str:
        info = self.detail(error_details_pb2.ResourceInfo)
        return info.resource_type if info is not None else ""

    @property
    def resource_name(self) -> str:
        info = self.detail(error_details_pb2.ResourceInfo)
        return info.resource_name if info is not None else ""


class AlreadyExists(FerruleError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(FerruleError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(FerruleError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(FerruleError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(FerruleError):
    """A concurrency conflict, e.g. an update or delete with a stale ``etag`` (AIP-154)."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(FerruleError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(FerruleError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(FerruleError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(FerruleError):
    """The service could not be reached; the channel already retried with backoff."""

    code = grpc.StatusCode.UNAVAILABLE

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asked the caller to wait before retrying, if it said."""
        info = self.detail(error_details_pb2.RetryInfo)
        if info is None or not info.HasField("retry_delay"):
            return None
        return float(info.retry_delay.ToTimedelta().total_seconds())


class DataLoss(FerruleError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(FerruleError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[FerruleError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def _pairs(metadata: Iterable[Any] | None) -> list[tuple[str, str | bytes]]:
    return [(str(key), value) for key, value in metadata or ()]


def from_rpc_error(err: grpc.RpcError) -> FerruleError:
    """The typed exception for a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``).

    Works on anything with the synchronous ``code()``, ``details()`` and
    ``trailing_metadata()`` of a finished call, which both APIs' errors provide. An error
    whose rich status is missing or inconsistent with its code still maps by code.
    """
    if isinstance(err, FerruleError):
        return err
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    text = (details_fn() if callable(details_fn) else None) or ""
    trailers_fn = getattr(err, "trailing_metadata", None)
    trailers = _pairs(trailers_fn() if callable(trailers_fn) else None)

    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(err)
    except (ValueError, DecodeError):
        status = None  # a Status that contradicts the call's code is not trusted
    details = [_unpack(d) for d in status.details] if status is not None else []
    message = status.message if status is not None and status.message else text
    cls = _BY_CODE.get(code, FerruleError)
    return cls(message, code=code, details=details, status=status, trailing_metadata=trailers)
