"""The synchronous client interceptor: deadline, credentials, tracing, typed errors.

Errors become :class:`~ferrule.client.errors.FerruleError` subclasses:

* blocking unary-response calls (``stub.Method(request)``, ``.with_call``) raise them;
* ``.future()`` calls still running when the interceptor returns keep gRPC's own
  ``grpc.RpcError`` (pass it to :func:`~ferrule.client.errors.from_rpc_error`);
* streaming responses raise them while being iterated; the returned object otherwise
  behaves like the gRPC call (``cancel()``, ``code()``, metadata...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ferrule.client.errors import from_rpc_error
from ferrule.client.outgoing import OutgoingPolicy
from ferrule.client.tracing import RpcSpan

__all__ = ["ClientInterceptor"]

_Req = TypeVar("_Req")


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def _finish_when_done(span: RpcSpan) -> Callable[[Any], None]:
    def done(future: Any) -> None:
        try:
            code = future.code()
        except Exception:  # a failed call may not expose a code; the span still ends
            code = None
        span.finish(code)

    return done


class _ErrorTranslatingIterator:
    """A streaming call whose iteration raises typed errors; everything else delegates."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> _ErrorTranslatingIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Applies an :class:`OutgoingPolicy` to every call and translates its errors."""

    def __init__(self, policy: OutgoingPolicy) -> None:
        self._policy = policy

    def _prepare(self, details: grpc.ClientCallDetails) -> tuple[_CallDetails, RpcSpan]:
        span = self._policy.start_span(details.method)
        new = _CallDetails(
            method=details.method,
            timeout=self._policy.timeout(details.timeout),
            metadata=self._policy.metadata(details.metadata, span),
            credentials=details.credentials,
            wait_for_ready=getattr(details, "wait_for_ready", None),
            compression=getattr(details, "compression", None),
        )
        return new, span

    def _unary_response(self, outcome: Any, span: RpcSpan) -> Any:
        if not outcome.done():  # a .future() call: finish the span when it completes
            outcome.add_done_callback(_finish_when_done(span))
            return outcome
        error = outcome.exception()
        if isinstance(error, grpc.RpcError):
            typed = from_rpc_error(error)
            span.finish(typed.code, typed)
            raise typed from error
        span.finish(grpc.StatusCode.OK if error is None else None, error)
        return outcome

    def _stream_response(self, call: Any, span: RpcSpan) -> Any:
        call.add_done_callback(_finish_when_done(span))
        return _ErrorTranslatingIterator(call)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> Any:
        details, span = self._prepare(client_call_details)
        return self._unary_response(continuation(details, request), span)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> Any:
        details, span = self._prepare(client_call_details)
        return self._stream_response(continuation(details, request), span)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> Any:
        details, span = self._prepare(client_call_details)
        return self._unary_response(continuation(details, request_iterator), span)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> Any:
        details, span = self._prepare(client_call_details)
        return self._stream_response(continuation(details, request_iterator), span)
