"""Watch helpers: follow an analysis or a batch until it is final, or the tail of new
predictions, across reconnects.

``WatchAnalysis`` and ``WatchBatch`` are level-triggered: every stream starts with the
current state, so resuming after a broken stream is opening another one. These helpers
do that with exponential backoff (with jitter) on UNAVAILABLE, CANCELLED by the
transport, ABORTED, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (the server's watch limit),
skip a first state equal to the last one delivered, and return when the stream ends
with the final state. Any other error (NOT_FOUND, PERMISSION_DENIED, ...) is raised.
Each stream is opened with the deadline ``stream_timeout`` (not the client's default
deadline, which suits unary calls): when it passes, the helper opens another stream,
which costs the server one read.
``max_attempts`` bounds consecutive failed attempts (an attempt that delivers a state
resets the count).

``WatchPredictions`` is a tail resumed from a cursor instead: :func:`awatch_predictions`
and :func:`watch_predictions` reconnect (same codes, same backoff, including the
server's WATCH_BACKLOG_EXCEEDED for a caller that read too slowly) with the cursor of the
last response they yielded, so each matching prediction is yielded once. They yield whole
responses: a caller that stores ``response.cursor`` after processing
``response.predictions`` can resume after its own restart with ``cursor=``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from ferrule.client.aio import AsyncFerruleClient
from ferrule.client.errors import FerruleError, from_rpc_error
from ferrule.client.ingest import RECONNECT_CODES
from ferrule.client.sync import FerruleClient
from ferrule.v1 import analysis_service_pb2 as pb
from ferrule.v1 import prediction_service_pb2 as ppb

M = TypeVar("M", bound=Message)

WATCH_RECONNECT_CODES = RECONNECT_CODES | {grpc.StatusCode.RESOURCE_EXHAUSTED}


class _Backoff:
    def __init__(self, initial: float, maximum: float, max_attempts: int) -> None:
        self.initial, self.maximum, self.max_attempts = initial, maximum, max_attempts
        self.failures = 0

    def failed(self, error: FerruleError) -> float:
        """The delay before the next attempt, or raise ``error`` when it must not retry."""
        if error.code not in WATCH_RECONNECT_CODES:
            raise error
        self.failures += 1
        if self.failures >= self.max_attempts:
            raise error
        delay = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        return float(delay * (0.5 + random.random() / 2))


def _typed(exc: BaseException) -> FerruleError | None:
    if isinstance(exc, FerruleError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc)
    return None


async def _afollow(
    open_stream: Callable[[], AsyncIterator[M]],
    initial_backoff: float,
    max_backoff: float,
    max_attempts: int,
) -> AsyncIterator[M]:
    backoff = _Backoff(initial_backoff, max_backoff, max_attempts)
    last: bytes | None = None
    while True:
        try:
            async for state in open_stream():
                backoff.failures = 0
                encoded = state.SerializeToString(deterministic=True)
                if encoded != last:
                    last = encoded
                    yield state
            return  # the server ends the stream after the final state
        except (FerruleError, aio.AioRpcError) as exc:
            typed = _typed(exc)
            assert typed is not None
            await asyncio.sleep(backoff.failed(typed))


def _follow(
    open_stream: Callable[[], Iterable[M]],
    initial_backoff: float,
    max_backoff: float,
    max_attempts: int,
) -> Iterator[M]:
    backoff = _Backoff(initial_backoff, max_backoff, max_attempts)
    last: bytes | None = None
    while True:
        try:
            for state in open_stream():
                backoff.failures = 0
                encoded = state.SerializeToString(deterministic=True)
                if encoded != last:
                    last = encoded
                    yield state
            return
        except (FerruleError, grpc.RpcError) as exc:
            typed = _typed(exc)
            assert typed is not None
            time.sleep(backoff.failed(typed))


async def _afollow_tail(
    open_stream: Callable[[str], AsyncIterator[ppb.WatchPredictionsResponse]],
    cursor: str,
    backoff: _Backoff,
) -> AsyncIterator[ppb.WatchPredictionsResponse]:
    while True:
        try:
            async for response in open_stream(cursor):
                backoff.failures = 0
                cursor = response.cursor
                if response.predictions:
                    yield response
            continue  # the tail has no end: a stream that ended is reopened
        except (FerruleError, aio.AioRpcError) as exc:
            typed = _typed(exc)
            assert typed is not None
            await asyncio.sleep(backoff.failed(typed))


def _follow_tail(
    open_stream: Callable[[str], Iterable[ppb.WatchPredictionsResponse]],
    cursor: str,
    backoff: _Backoff,
) -> Iterator[ppb.WatchPredictionsResponse]:
    while True:
        try:
            for response in open_stream(cursor):
                backoff.failures = 0
                cursor = response.cursor
                if response.predictions:
                    yield response
            continue
        except (FerruleError, grpc.RpcError) as exc:
            typed = _typed(exc)
            assert typed is not None
            time.sleep(backoff.failed(typed))


def awatch_predictions(
    client: AsyncFerruleClient,
    parent: str,
    filter: ppb.PredictionFilter | None = None,
    *,
    cursor: str = "",
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    max_attempts: int = 10,
    stream_timeout: float = 300.0,
) -> AsyncIterator[ppb.WatchPredictionsResponse]:
    """Every response of ``WatchPredictions`` that carries predictions, from ``cursor``
    (empty: now), forever, resuming after the last one yielded on every reconnect
    (asyncio)."""

    def open_stream(after: str) -> AsyncIterator[ppb.WatchPredictionsResponse]:
        request = ppb.WatchPredictionsRequest(parent=parent, filter=filter, cursor=after)
        return aiter(client.predictions.WatchPredictions(request, timeout=stream_timeout))

    backoff = _Backoff(initial_backoff, max_backoff, max_attempts)
    return _afollow_tail(open_stream, cursor, backoff)


def watch_predictions(
    client: FerruleClient,
    parent: str,
    filter: ppb.PredictionFilter | None = None,
    *,
    cursor: str = "",
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    max_attempts: int = 10,
    stream_timeout: float = 300.0,
) -> Iterator[ppb.WatchPredictionsResponse]:
    """:func:`awatch_predictions` for the blocking client."""

    def open_stream(after: str) -> Iterable[ppb.WatchPredictionsResponse]:
        request = ppb.WatchPredictionsRequest(parent=parent, filter=filter, cursor=after)
        return client.predictions.WatchPredictions(request, timeout=stream_timeout)

    backoff = _Backoff(initial_backoff, max_backoff, max_attempts)
    return _follow_tail(open_stream, cursor, backoff)


def awatch_analysis(
    client: AsyncFerruleClient,
    name: str,
    *,
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    max_attempts: int = 10,
    stream_timeout: float = 300.0,
) -> AsyncIterator[pb.Analysis]:
    """Every new state of the analysis ``name`` until COMPLETED or FAILED (asyncio)."""
    request = pb.WatchAnalysisRequest(name=name)

    def open_stream() -> AsyncIterator[pb.Analysis]:
        return aiter(client.analyses.WatchAnalysis(request, timeout=stream_timeout))

    return _afollow(open_stream, initial_backoff, max_backoff, max_attempts)


def awatch_batch(
    client: AsyncFerruleClient,
    name: str,
    *,
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    max_attempts: int = 10,
    stream_timeout: float = 300.0,
) -> AsyncIterator[pb.AnalysisBatch]:
    """The batch ``name`` with its progress, on every change, until every member is
    terminal (asyncio)."""
    request = pb.WatchBatchRequest(name=name)

    def open_stream() -> AsyncIterator[pb.AnalysisBatch]:
        return aiter(client.analyses.WatchBatch(request, timeout=stream_timeout))

    return _afollow(open_stream, initial_backoff, max_backoff, max_attempts)


def watch_analysis(
    client: FerruleClient,
    name: str,
    *,
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    max_attempts: int = 10,
    stream_timeout: float = 300.0,
) -> Iterator[pb.Analysis]:
    """:func:`awatch_analysis` for the blocking client."""
    request = pb.WatchAnalysisRequest(name=name)

    def open_stream() -> Iterable[pb.Analysis]:
        return client.analyses.WatchAnalysis(request, timeout=stream_timeout)

    return _follow(open_stream, initial_backoff, max_backoff, max_attempts)


def watch_batch(
    client: FerruleClient,
    name: str,
    *,
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    max_attempts: int = 10,
    stream_timeout: float = 300.0,
) -> Iterator[pb.AnalysisBatch]:
    """:func:`awatch_batch` for the blocking client."""
    request = pb.WatchBatchRequest(name=name)

    def open_stream() -> Iterable[pb.AnalysisBatch]:
        return client.analyses.WatchBatch(request, timeout=stream_timeout)

    return _follow(open_stream, initial_backoff, max_backoff, max_attempts)


__all__: list[str] = [
    "WATCH_RECONNECT_CODES",
    "awatch_analysis",
    "awatch_batch",
    "awatch_predictions",
    "watch_analysis",
    "watch_batch",
    "watch_predictions",
]
