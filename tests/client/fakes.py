"""Fake servicers whose behaviour each test picks through the request.

``grpc.health.v1.Health/Check`` reads ``service`` as ``<behaviour>:<key>``; the key is
unique per test so that attempt counts and recorded metadata never mix between tests.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.longrunning import (  # type: ignore[import-untyped]
    operations_pb2_grpc,
    operations_proto_pb2,
)
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from ferrule.v1 import (
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

Context = aio.ServicerContext[Any, Any]
SERVING = health_pb2.HealthCheckResponse.SERVING


def rich_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    """A ``grpc.Status`` carrying a ``google.rpc.Status`` with ``details`` (AIP-193)."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return cast(grpc.Status, rpc_status.to_status(status))


def error_info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="ferrule", metadata={"k": "v"})


@dataclass
class Recorder:
    """What the server saw, by test key."""

    attempts: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    metadata: dict[str, dict[str, str | bytes]] = field(default_factory=dict)
    time_remaining: dict[str, float | None] = field(default_factory=dict)
    client_common_names: dict[str, list[bytes]] = field(default_factory=dict)


class FakeHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        behaviour, _, key = request.service.partition(":")
        self.recorder.attempts[key] += 1
        attempt = self.recorder.attempts[key]
        self.recorder.metadata[key] = dict(context.invocation_metadata() or ())
        self.recorder.time_remaining[key] = context.time_remaining()
        common_names = context.auth_context().get("x509_common_name", [])
        self.recorder.client_common_names[key] = list(common_names)
        match behaviour:
            case "ok":
                pass
            case "flaky" if attempt <= 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            case "flaky":
                pass
            case "down":
                retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))
                await context.abort_with_status(
                    rich_status(grpc.StatusCode.UNAVAILABLE, "down", error_info("DOWN"), retry)
                )
            case "invalid":
                bad = error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="page_size", description="must not be negative"
                        ),
                        error_details_pb2.BadRequest.FieldViolation(
                            field="user.email", description="not an email address"
                        ),
                    ]
                )
                await context.abort_with_status(
                    rich_status(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "bad request",
                        error_info("INVALID_FIELDS"),
                        bad,
                    )
                )
            case "missing":
                info = error_details_pb2.ResourceInfo(
                    resource_type="ferrule.v1.User",
                    resource_name="organizations/o/users/u",
                    description="no such user",
                )
                await context.abort_with_status(
                    rich_status(
                        grpc.StatusCode.NOT_FOUND, "user not found", error_info("NOT_FOUND"), info
                    )
                )
            case "denied":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no details here")
            case "sleep":
                await asyncio.sleep(10)  # the client's deadline ends the call long before
            case _:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, behaviour)
        return health_pb2.HealthCheckResponse(status=SERVING)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Two updates, then NOT_FOUND with a ResourceInfo (a streaming failure)."""
        for _ in range(2):
            yield health_pb2.HealthCheckResponse(status=SERVING)
        info = error_details_pb2.ResourceInfo(resource_type="service", resource_name="gone")
        await context.abort_with_status(rich_status(grpc.StatusCode.NOT_FOUND, "gone", info))


class FakeOperations(operations_pb2_grpc.OperationsServicer):  # type: ignore[misc]
    """``ListOperations`` over ``count`` operations, ``page_size`` at a time."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.requests: list[operations_proto_pb2.ListOperationsRequest] = []

    async def ListOperations(
        self, request: operations_proto_pb2.ListOperationsRequest, context: Context
    ) -> operations_proto_pb2.ListOperationsResponse:
        self.requests.append(request)
        start = int(request.page_token or "0")
        end = min(start + (request.page_size or 2), self.count)
        response = operations_proto_pb2.ListOperationsResponse(
            operations=[
                operations_proto_pb2.Operation(name=f"{request.name}/operations/{i}")
                for i in range(start, end)
            ]
        )
        if end < self.count:
            response.next_page_token = str(end)
        return response


class FakeUsers(user_service_pb2_grpc.UserServiceServicer):
    """``GetUser`` keyed by the user id (``flaky-*`` fails twice, ``missing-*`` is
    NOT_FOUND) and ``ListUsers`` over five users, two a page unless asked otherwise."""

    USERS = 5

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: Context
    ) -> user_service_pb2.User:
        key = request.name.rpartition("/")[2]
        self.recorder.attempts[key] += 1
        self.recorder.metadata[key] = dict(context.invocation_metadata() or ())
        self.recorder.time_remaining[key] = context.time_remaining()
        if key.startswith("flaky-") and self.recorder.attempts[key] <= 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if key.startswith("missing-"):
            info = error_details_pb2.ResourceInfo(
                resource_type="ferrule.v1.User", resource_name=request.name
            )
            await context.abort_with_status(
                rich_status(grpc.StatusCode.NOT_FOUND, "no user", error_info("NOT_FOUND"), info)
            )
        return user_service_pb2.User(name=request.name, email=f"{key}@example.com")

    async def ListUsers(
        self, request: user_service_pb2.ListUsersRequest, context: Context
    ) -> user_service_pb2.ListUsersResponse:
        start = int(request.page_token or "0")
        end = min(start + (request.page_size or 2), self.USERS)
        names = [f"{request.parent}/users/{i}" for i in range(start, end)]
        users = [user_service_pb2.User(name=name) for name in names]
        response = user_service_pb2.ListUsersResponse(users=users, total_size=self.USERS)
        if end < self.USERS:
            response.next_page_token = str(end)
        return response


class FakePredictions(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``StreamPredictions`` acknowledging each batch; batch id ``bad`` fails the stream
    with INVALID_ARGUMENT."""

    async def StreamPredictions(
        self,
        request_iterator: AsyncIterator[prediction_service_pb2.StreamPredictionsRequest],
        context: Context,
    ) -> AsyncIterator[prediction_service_pb2.StreamPredictionsResponse]:
        async for batch in request_iterator:
            if batch.batch_id == "bad":
                bad = error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="batch_id", description="bad batch"
                        )
                    ]
                )
                await context.abort_with_status(
                    rich_status(grpc.StatusCode.INVALID_ARGUMENT, "bad batch", bad)
                )
            yield prediction_service_pb2.StreamPredictionsResponse(
                batch_id=batch.batch_id, accepted=len(batch.predictions)
            )


def register_fakes(server: aio.Server, recorder: Recorder, operations: FakeOperations) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(FakeHealth(recorder), server)
    operations_pb2_grpc.add_OperationsServicer_to_server(operations, server)
    # The other UserService methods keep the generated UNIMPLEMENTED bodies at runtime.
    users = FakeUsers(recorder)  # type: ignore[abstract]
    user_service_pb2_grpc.add_UserServiceServicer_to_server(users, server)
    predictions = FakePredictions()  # type: ignore[abstract]
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(predictions, server)
