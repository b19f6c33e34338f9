"""The synchronous Ferrule client: one channel, a typed stub per service."""

from __future__ import annotations

from types import TracebackType

import grpc

from ferrule.client.channel import create_channel
from ferrule.client.config import ClientConfig, resolve_config
from ferrule.v1 import (
    analysis_service_pb2_grpc,
    health_service_pb2_grpc,
    prediction_service_pb2_grpc,
    user_service_pb2_grpc,
)

__all__ = ["FerruleClient"]


class FerruleClient:
    """A blocking client for every Ferrule service.

    >>> with FerruleClient("127.0.0.1:50051", token=jwt) as client:
    ...     user = client.users.GetUser(user_service_pb2.GetUserRequest(name=name))

    Calls get the configured default deadline, retry UNAVAILABLE with backoff, carry the
    bearer token and the current trace context, and raise
    :class:`~ferrule.client.errors.FerruleError` subclasses on failure.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = resolve_config(target, token, config)
        self.channel: grpc.Channel = create_channel(self.config)
        self.users = user_service_pb2_grpc.UserServiceStub(self.channel)
        self.analyses = analysis_service_pb2_grpc.AnalysisServiceStub(self.channel)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.health = health_service_pb2_grpc.HealthServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()

    def __enter__(self) -> FerruleClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
