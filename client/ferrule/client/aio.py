"""The asyncio Ferrule client: one ``grpc.aio`` channel, a typed stub per service."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from grpc import aio

from ferrule.client.channel import create_aio_channel
from ferrule.client.config import ClientConfig, resolve_config
from ferrule.v1 import (
    analysis_service_pb2_grpc,
    health_service_pb2_grpc,
    prediction_service_pb2_grpc,
    user_service_pb2_grpc,
)

if TYPE_CHECKING:  # the async stub types exist only in the .pyi files
    from ferrule.v1.analysis_service_pb2_grpc import AnalysisServiceAsyncStub
    from ferrule.v1.health_service_pb2_grpc import HealthServiceAsyncStub
    from ferrule.v1.prediction_service_pb2_grpc import PredictionServiceAsyncStub
    from ferrule.v1.user_service_pb2_grpc import UserServiceAsyncStub

__all__ = ["AsyncFerruleClient"]


class AsyncFerruleClient:
    """An asyncio client for every Ferrule service; create it inside the event loop.

    >>> async with AsyncFerruleClient("127.0.0.1:50051", token=jwt) as client:
    ...     user = await client.users.GetUser(user_service_pb2.GetUserRequest(name=name))

    Same behaviour as :class:`~ferrule.client.sync.FerruleClient` (deadline, retries,
    token, trace context, typed errors).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = resolve_config(target, token, config)
        self.channel: aio.Channel = create_aio_channel(self.config)
        self.users: UserServiceAsyncStub = user_service_pb2_grpc.UserServiceStub(self.channel)
        self.analyses: AnalysisServiceAsyncStub = analysis_service_pb2_grpc.AnalysisServiceStub(
            self.channel
        )
        self.predictions: PredictionServiceAsyncStub = (
            prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        )
        self.health: HealthServiceAsyncStub = health_service_pb2_grpc.HealthServiceStub(
            self.channel
        )

    async def close(self, grace: float | None = None) -> None:
        """Close the channel, letting calls in flight finish for ``grace`` seconds."""
        await self.channel.close(grace)

    async def __aenter__(self) -> AsyncFerruleClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
