"""The hand-written client layer against a real grpc.aio server on 127.0.0.1.

Every behaviour is checked through both the sync channel (called from a worker thread)
and the asyncio channel.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.longrunning import (  # type: ignore[import-untyped]
    operations_pb2_grpc,
    operations_proto_pb2,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ferrule.client import AsyncFerruleClient, FerruleClient, errors
from ferrule.client.channel import create_aio_channel, create_channel
from ferrule.client.config import ClientConfig, channel_options, service_config
from ferrule.client.pagination import aiterate_items, aiterate_pages, iterate_items, iterate_pages
from ferrule.v1 import (
    analysis_service_pb2_grpc,
    health_service_pb2_grpc,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from tests.client.fakes import SERVING, FakeOperations, Recorder, register_fakes
from tests.client.servers import ServerThread

MODES = ["sync", "aio"]
WIRE_ROUNDING = 0.1


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def operations() -> FakeOperations:
    return FakeOperations(count=5)


@pytest.fixture(scope="module")
def server(recorder: Recorder, operations: FakeOperations) -> Iterator[ServerThread]:
    with ServerThread(lambda s: register_fakes(s, recorder, operations)) as running:
        yield running


@pytest.fixture
def key() -> str:
    return uuid.uuid4().hex


def config_for(server: ServerThread, **overrides: Any) -> ClientConfig:
    settings: dict[str, Any] = {"target": server.target, "initial_backoff": 0.01}
    settings.update(overrides)
    return ClientConfig(**settings)


async def check(
    mode: str, config: ClientConfig, service: str, **call_options: Any
) -> health_pb2.HealthCheckResponse:
    """One Health/Check through a fresh channel of the given mode."""
    request = health_pb2.HealthCheckRequest(service=service)
    if mode == "sync":

        def call() -> health_pb2.HealthCheckResponse:
            with create_channel(config) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(request, **call_options)

        return await asyncio.to_thread(call)
    async with create_aio_channel(config) as channel:
        response: health_pb2.HealthCheckResponse = await health_pb2_grpc.HealthStub(channel).Check(
            request, **call_options
        )
        return response


@pytest.mark.parametrize("mode", MODES)
async def test_unavailable_is_retried_until_success(mode, server, recorder, key):
    response = await check(mode, config_for(server), f"flaky:{key}")
    assert response.status == SERVING
    assert recorder.attempts[key] == 3


@pytest.mark.parametrize("mode", MODES)
async def test_unavailable_after_max_attempts_carries_retry_info(mode, server, recorder, key):
    with pytest.raises(errors.Unavailable) as raised:
        await check(mode, config_for(server, max_attempts=3), f"down:{key}")
    assert recorder.attempts[key] == 3
    assert raised.value.retry_delay == 2.0
    assert raised.value.reason == "DOWN"


@pytest.mark.parametrize("mode", MODES)
async def test_max_attempts_one_disables_retries(mode, server, recorder, key):
    with pytest.raises(errors.Unavailable):
        await check(mode, config_for(server, max_attempts=1), f"flaky:{key}")
    assert recorder.attempts[key] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_invalid_argument_is_not_retried_and_carries_field_violations(
    mode, server, recorder, key
):
    with pytest.raises(errors.InvalidArgument) as raised:
        await check(mode, config_for(server), f"invalid:{key}")
    assert recorder.attempts[key] == 1
    error = raised.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "bad request"
    assert error.field_violations == [
        ("page_size", "must not be negative"),
        ("user.email", "not an email address"),
    ]
    assert (error.reason, error.domain, dict(error.metadata)) == (
        "INVALID_FIELDS",
        "ferrule",
        {"k": "v"},
    )
    assert isinstance(error.__cause__, grpc.RpcError)


@pytest.mark.parametrize("mode", MODES)
async def test_not_found_carries_resource_info(mode, server, recorder, key):
    with pytest.raises(errors.NotFound) as raised:
        await check(mode, config_for(server), f"missing:{key}")
    assert recorder.attempts[key] == 1
    assert raised.value.resource_type == "ferrule.v1.User"
    assert raised.value.resource_name == "organizations/o/users/u"
    assert raised.value.reason == "NOT_FOUND"


@pytest.mark.parametrize("mode", MODES)
async def test_error_without_rich_status_maps_by_code(mode, server, key):
    with pytest.raises(errors.PermissionDenied) as raised:
        await check(mode, config_for(server), f"denied:{key}")
    assert raised.value.message == "no details here"
    assert raised.value.reason == ""
    assert raised.value.status is None


@pytest.mark.parametrize("mode", MODES)
async def test_default_deadline_applies_only_without_caller_timeout(mode, server, recorder, key):
    config = config_for(server, default_timeout=2.5)
    await check(mode, config, f"ok:{key}")
    remaining = recorder.time_remaining[key]
    assert remaining is not None
    # The grpc-timeout header is rounded up to its wire unit, hence the small margin.
    assert 0 < remaining <= 2.5 + WIRE_ROUNDING

    await check(mode, config, f"ok:{key}", timeout=60)
    remaining = recorder.time_remaining[key]
    assert remaining is not None
    assert remaining > 2.5 + WIRE_ROUNDING


@pytest.mark.parametrize("mode", MODES)
async def test_handler_slower_than_default_deadline_raises_deadline_exceeded(mode, server, key):
    with pytest.raises(errors.DeadlineExceeded):
        await check(mode, config_for(server, default_timeout=0.2), f"sleep:{key}")


@pytest.mark.parametrize("mode", MODES)
async def test_bearer_token_reaches_the_server(mode, server, recorder, key):
    await check(mode, config_for(server, token="s3cret"), f"ok:{key}")
    assert recorder.metadata[key]["authorization"] == "Bearer s3cret"


@pytest.mark.parametrize("mode", MODES)
async def test_caller_authorization_metadata_wins(mode, server, recorder, key):
    metadata = (("authorization", "Bearer other"),)
    await check(mode, config_for(server, token="s3cret"), f"ok:{key}", metadata=metadata)
    assert recorder.metadata[key]["authorization"] == "Bearer other"


@pytest.mark.parametrize("mode", MODES)
async def test_no_token_no_authorization(mode, server, recorder, key):
    await check(mode, config_for(server), f"ok:{key}")
    assert "authorization" not in recorder.metadata[key]
    assert "traceparent" not in recorder.metadata[key]


@pytest.mark.parametrize("mode", MODES)
async def test_traceparent_names_the_client_span_of_the_active_trace(mode, server, recorder, key):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    config = config_for(server, tracer_provider=provider)

    with tracer.start_as_current_span("caller") as parent:
        await check(mode, config, f"ok:{key}")
    traceparent = recorder.metadata[key]["traceparent"]
    assert isinstance(traceparent, str)
    _, trace_id, parent_id, _ = traceparent.split("-")

    spans = {span.name: span for span in exporter.get_finished_spans()}
    client_span = spans["grpc.health.v1.Health/Check"]
    assert client_span.kind is trace.SpanKind.CLIENT
    assert client_span.context is not None
    assert client_span.parent is not None
    assert client_span.parent.span_id == parent.get_span_context().span_id
    assert int(trace_id, 16) == parent.get_span_context().trace_id
    assert int(parent_id, 16) == client_span.context.span_id
    assert client_span.attributes is not None
    assert client_span.attributes["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize("mode", MODES)
async def test_failed_call_marks_its_span_as_error(mode, server, key):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with pytest.raises(errors.NotFound):
        await check(mode, config_for(server, tracer_provider=provider), f"missing:{key}")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_sync_stream_errors_are_typed(server):
    request = health_pb2.HealthCheckRequest(service="any")
    with create_channel(config_for(server)) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(request)
        received: list[int] = []

        def drain() -> None:
            for response in call:
                received.append(response.status)

        with pytest.raises(errors.NotFound) as raised:
            drain()
        assert received == [SERVING, SERVING]
        assert raised.value.resource_name == "gone"
        assert call.code() is grpc.StatusCode.NOT_FOUND


async def test_aio_stream_errors_are_typed(server):
    request = health_pb2.HealthCheckRequest(service="any")
    async with create_aio_channel(config_for(server)) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(request)
        received: list[int] = []

        async def drain() -> None:
            async for response in call:
                received.append(response.status)

        with pytest.raises(errors.NotFound) as raised:
            await drain()
        assert received == [SERVING, SERVING]
        assert raised.value.resource_name == "gone"
        assert await call.code() is grpc.StatusCode.NOT_FOUND


def list_request() -> operations_proto_pb2.ListOperationsRequest:
    return operations_proto_pb2.ListOperationsRequest(name="jobs", page_size=2)


def test_sync_pagers_walk_three_pages(server, operations):
    request = list_request()
    with create_channel(config_for(server)) as channel:
        stub = operations_pb2_grpc.OperationsStub(channel)
        pages = list(iterate_pages(stub.ListOperations, request))
        items = list(iterate_items(stub.ListOperations, request, "operations"))
    assert [len(page.operations) for page in pages] == [2, 2, 1]
    assert [op.name for op in items] == [f"jobs/operations/{i}" for i in range(5)]
    assert request.page_token == ""  # the caller's request is not modified
    assert [r.page_token for r in operations.requests[-3:]] == ["", "2", "4"]
    assert all(r.name == "jobs" and r.page_size == 2 for r in operations.requests[-3:])


async def test_aio_pagers_walk_three_pages(server, operations):
    request = list_request()
    async with create_aio_channel(config_for(server)) as channel:
        stub = operations_pb2_grpc.OperationsStub(channel)
        pages = [page async for page in aiterate_pages(stub.ListOperations, request)]
        items = [op async for op in aiterate_items(stub.ListOperations, request, "operations")]
    assert [len(page.operations) for page in pages] == [2, 2, 1]
    assert [op.name for op in items] == [f"jobs/operations/{i}" for i in range(5)]
    assert [r.page_token for r in operations.requests[-3:]] == ["", "2", "4"]


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="max_attempts"):
        ClientConfig(target="x:1", max_attempts=6)
    with pytest.raises(ValueError, match="tls"):
        ClientConfig(target="x:1", root_certificates=b"pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        ClientConfig(target="x:1", tls=True, certificate_chain=b"pem")


# The Ferrule clients themselves, over the generated ferrule.v1 stubs.

ORG = "organizations/0192f0a0-0000-7000-8000-000000000001"


def user_request(user_id: str) -> user_service_pb2.GetUserRequest:
    return user_service_pb2.GetUserRequest(name=f"{ORG}/users/{user_id}")


def test_sync_client_retries_and_sends_token_and_deadline(server, recorder):
    config = config_for(server, token="t0k", default_timeout=5)
    with FerruleClient(config=config) as client:
        user = client.users.GetUser(user_request("flaky-s"))
        assert user.email == "flaky-s@example.com"
        with pytest.raises(errors.NotFound) as raised:
            client.users.GetUser(user_request("missing-s"))
    assert recorder.attempts["flaky-s"] == 3
    assert recorder.attempts["missing-s"] == 1
    assert raised.value.resource_name == f"{ORG}/users/missing-s"
    assert recorder.metadata["flaky-s"]["authorization"] == "Bearer t0k"
    remaining = recorder.time_remaining["flaky-s"]
    assert remaining is not None
    assert remaining <= 5 + WIRE_ROUNDING


async def test_aio_client_retries_and_sends_token_and_deadline(server, recorder):
    config = config_for(server, default_timeout=5)
    async with AsyncFerruleClient(token="t0k", config=config) as client:
        user = await client.users.GetUser(user_request("flaky-a"))
        assert user.email == "flaky-a@example.com"
        with pytest.raises(errors.NotFound) as raised:
            await client.users.GetUser(user_request("missing-a"))
    assert recorder.attempts["flaky-a"] == 3
    assert recorder.attempts["missing-a"] == 1
    assert raised.value.resource_name == f"{ORG}/users/missing-a"
    assert recorder.metadata["flaky-a"]["authorization"] == "Bearer t0k"
    remaining = recorder.time_remaining["flaky-a"]
    assert remaining is not None
    assert remaining <= 5 + WIRE_ROUNDING


def test_sync_client_pages_through_users(server):
    request = user_service_pb2.ListUsersRequest(parent=ORG, page_size=2)
    with FerruleClient(server.target) as client:
        pages = list(iterate_pages(client.users.ListUsers, request))
        users = list(iterate_items(client.users.ListUsers, request, "users"))
    assert [len(page.users) for page in pages] == [2, 2, 1]
    assert [u.name for u in users] == [f"{ORG}/users/{i}" for i in range(5)]


async def test_aio_client_pages_through_users(server):
    request = user_service_pb2.ListUsersRequest(parent=ORG, page_size=2)
    async with AsyncFerruleClient(server.target) as client:
        pages = [p async for p in aiterate_pages(client.users.ListUsers, request)]
        users = [u async for u in aiterate_items(client.users.ListUsers, request, "users")]
    assert [len(page.users) for page in pages] == [2, 2, 1]
    assert [u.name for u in users] == [f"{ORG}/users/{i}" for i in range(5)]


def test_clients_expose_a_stub_per_service(server):
    with FerruleClient(server.target) as client:
        assert isinstance(client.users, user_service_pb2_grpc.UserServiceStub)
        assert isinstance(client.analyses, analysis_service_pb2_grpc.AnalysisServiceStub)
        assert isinstance(client.predictions, prediction_service_pb2_grpc.PredictionServiceStub)
        assert isinstance(client.health, health_service_pb2_grpc.HealthServiceStub)


def test_client_needs_a_target():
    with pytest.raises(ValueError, match="target"):
        FerruleClient()


def batch(batch_id: str, rows: int = 1) -> prediction_service_pb2.StreamPredictionsRequest:
    return prediction_service_pb2.StreamPredictionsRequest(
        parent=ORG,
        batch_id=batch_id,
        predictions=[prediction_service_pb2.Prediction() for _ in range(rows)],
    )


async def test_aio_bidi_stream_write_read_through_the_interceptors(server):
    async with AsyncFerruleClient(server.target) as client:
        call = client.predictions.StreamPredictions()
        await call.write(batch("b1", rows=3))
        first = await call.read()
        await call.write(batch("b2", rows=2))
        second = await call.read()
        await call.done_writing()
        end = await call.read()
        assert await call.code() is grpc.StatusCode.OK
    assert isinstance(first, prediction_service_pb2.StreamPredictionsResponse)
    assert isinstance(second, prediction_service_pb2.StreamPredictionsResponse)
    assert (first.batch_id, first.accepted) == ("b1", 3)
    assert (second.batch_id, second.accepted) == ("b2", 2)
    assert end is grpc.aio.EOF


async def test_aio_bidi_stream_error_is_typed(server):
    async def batches() -> AsyncIterator[prediction_service_pb2.StreamPredictionsRequest]:
        yield batch("b1")
        yield batch("bad")

    acks: list[str] = []

    async def drain(client: AsyncFerruleClient) -> None:
        async for ack in client.predictions.StreamPredictions(batches()):
            acks.append(ack.batch_id)

    async with AsyncFerruleClient(server.target) as client:
        with pytest.raises(errors.InvalidArgument) as raised:
            await drain(client)
    assert acks == ["b1"]
    assert raised.value.field_violations == [("batch_id", "bad batch")]


def test_sync_bidi_stream_error_is_typed(server):
    acks: list[str] = []

    def drain(client: FerruleClient) -> None:
        for ack in client.predictions.StreamPredictions(iter([batch("b1"), batch("bad")])):
            acks.append(ack.batch_id)

    with FerruleClient(server.target) as client, pytest.raises(errors.InvalidArgument) as raised:
        drain(client)
    assert acks == ["b1"]
    assert raised.value.field_violations == [("batch_id", "bad batch")]


def test_service_config_retries_only_unavailable_on_every_ferrule_service():
    config = ClientConfig(target="x:1", max_attempts=5, initial_backoff=0.25, max_backoff=3)
    (method_config,) = service_config(config)["methodConfig"]
    services = {name["service"] for name in method_config["name"]}
    assert services >= {
        "ferrule.v1.UserService",
        "ferrule.v1.AnalysisService",
        "ferrule.v1.PredictionService",
        "ferrule.v1.HealthService",
    }
    assert method_config["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.25s",
        "maxBackoff": "3s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    options = dict(channel_options(config))
    assert options["grpc.enable_retries"] == 1
    assert json.loads(options["grpc.service_config"]) == service_config(config)
