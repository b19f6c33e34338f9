"""PredictionService end to end: the real server, called only through the client package."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from db.cache import create_cache
from ferrule.client import (
    AlreadyExists,
    AsyncFerruleClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from ferrule.v1 import common_pb2
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1 import user_service_pb2 as upb
from tests.polling import eventually
from tests.server.conftest import RunningServer

NOW = datetime.now(UTC).replace(microsecond=0)


async def new_org(server: RunningServer, display_name: str = "org") -> str:
    org = await server.admin().users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name=display_name))
    )
    return org.name


def org_id(parent: str) -> str:
    return parent.rsplit("/", 1)[1]


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def prediction(
    probability: float = 0.5,
    *,
    subject: str = "emp-1",
    version: str = "v1",
    model: str = "attrition",
    risk: int = pb.RISK_LEVEL_UNSPECIFIED,
    at: datetime | None = None,
) -> pb.Prediction:
    message = pb.Prediction(
        subject_id=subject,
        probability=probability,
        model_name=model,
        model_version=version,
        risk_level=risk,  # type: ignore[arg-type]
    )
    message.features.update({"age": 41, "department": "sales", "tenure": [1, 2.5]})
    if at is not None:
        message.predict_time.CopyFrom(ts(at))
    return message


async def batch_create(
    client: AsyncFerruleClient, parent: str, items: list[pb.Prediction]
) -> list[pb.Prediction]:
    created: list[pb.Prediction] = []
    for start in range(0, len(items), 1000):
        response = await client.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(
                parent=parent,
                requests=[
                    pb.CreatePredictionRequest(prediction=p) for p in items[start : start + 1000]
                ],
            )
        )
        created += response.predictions
    return created


async def total(client: AsyncFerruleClient, parent: str) -> int:
    response = await client.predictions.ListPredictions(pb.ListPredictionsRequest(parent=parent))
    return response.total_size


def violations(error: InvalidArgument) -> dict[str, str]:
    return dict(error.field_violations)


async def test_create_and_get_with_derived_risk_level(any_server: RunningServer) -> None:
    parent = await new_org(any_server)
    client = any_server.for_org(org_id(parent), subject="model-runner")
    chosen = str(uuid.uuid4())
    created = await client.predictions.CreatePrediction(
        pb.CreatePredictionRequest(
            parent=parent,
            prediction=prediction(0.2, at=NOW - timedelta(hours=1)),
            prediction_id=chosen,
        )
    )
    assert created.name == f"{parent}/predictions/{chosen}"
    assert created.risk_level == pb.RISK_LEVEL_LOW
    assert created.create_by == "model-runner"
    assert uuid.UUID(created.request_id)  # server-generated when the call had none
    assert created.predict_time.ToDatetime(tzinfo=UTC) == NOW - timedelta(hours=1)
    assert dict(created.features)["department"] == "sales"
    fetched = await client.predictions.GetPrediction(pb.GetPredictionRequest(name=created.name))
    assert fetched == created

    derived = {}
    for p in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0):
        made = await client.predictions.CreatePrediction(
            pb.CreatePredictionRequest(parent=parent, prediction=prediction(p))
        )
        derived[p] = made.risk_level
        assert made.predict_time.seconds > 0  # defaults to the time of receipt
    assert derived == {
        0.0: pb.RISK_LEVEL_LOW,
        0.29: pb.RISK_LEVEL_LOW,
        0.3: pb.RISK_LEVEL_MEDIUM,
        0.69: pb.RISK_LEVEL_MEDIUM,
        0.7: pb.RISK_LEVEL_HIGH,
        1.0: pb.RISK_LEVEL_HIGH,
    }
    explicit = await client.predictions.CreatePrediction(
        pb.CreatePredictionRequest(
            parent=parent, prediction=prediction(0.1, risk=pb.RISK_LEVEL_HIGH)
        )
    )
    assert explicit.risk_level == pb.RISK_LEVEL_HIGH

    with pytest.raises(AlreadyExists) as taken:
        await client.predictions.CreatePrediction(
            pb.CreatePredictionRequest(parent=parent, prediction=prediction(), prediction_id=chosen)
        )
    assert taken.value.reason == "RESOURCE_ALREADY_EXISTS"

    missing = f"{parent}/predictions/{uuid.uuid4()}"
    with pytest.raises(NotFound) as not_found:
        await client.predictions.GetPrediction(pb.GetPredictionRequest(name=missing))
    assert not_found.value.resource_name == missing
    assert not_found.value.resource_type == "ferrule.v1.Prediction"
    with pytest.raises(InvalidArgument) as bad_name:
        await client.predictions.GetPrediction(
            pb.GetPredictionRequest(name=f"{parent}/predictions/not-a-uuid")
        )
    assert "name" in violations(bad_name.value)


async def test_create_validates_every_field(db_server: RunningServer) -> None:
    parent = await new_org(db_server)
    client = db_server.for_org(org_id(parent))
    # Text over its column's length is refused first, by the input boundary, on its own...
    with pytest.raises(InvalidArgument) as too_long:
        await client.predictions.CreatePrediction(
            pb.CreatePredictionRequest(
                parent=parent, prediction=pb.Prediction(model_name="m" * 300, probability=1.5)
            )
        )
    assert list(violations(too_long.value)) == ["prediction.model_name"]
    # ...and every rule of the service at once for a request that passes the boundary.
    bad = pb.Prediction(probability=1.5, risk_level=7)  # type: ignore[arg-type]
    bad.features.update({"too_big": "x" * 70_000})
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.CreatePrediction(
            pb.CreatePredictionRequest(
                parent=parent, prediction=bad, prediction_id="nope", request_id="also-nope"
            )
        )
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert set(violations(caught.value)) == {
        "prediction_id",
        "request_id",
        "prediction.subject_id",
        "prediction.model_version",
        "prediction.probability",
        "prediction.risk_level",
        "prediction.features",
    }
    for value in (math.nan, -0.01, math.inf):
        with pytest.raises(InvalidArgument) as caught:
            await client.predictions.CreatePrediction(
                pb.CreatePredictionRequest(parent=parent, prediction=prediction(value))
            )
        assert set(violations(caught.value)) == {"prediction.probability"}
    nan_feature = prediction()
    nan_feature.features["score"] = math.nan
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.CreatePrediction(
            pb.CreatePredictionRequest(parent=parent, prediction=nan_feature)
        )
    assert set(violations(caught.value)) == {"prediction.features.score"}
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.CreatePrediction(
            pb.CreatePredictionRequest(parent="organizations/x", prediction=prediction())
        )
    assert "parent" in violations(caught.value)
    assert await total(client, parent) == 0


async def test_retried_creates_with_a_request_id_write_once(db_server: RunningServer) -> None:
    parent = await new_org(db_server)
    client = db_server.for_org(org_id(parent))
    request = pb.CreatePredictionRequest(
        parent=parent, prediction=prediction(0.4), request_id=str(uuid.uuid4())
    )
    first = await client.predictions.CreatePrediction(request)
    again = await client.predictions.CreatePrediction(request)
    assert again == first
    assert first.request_id == request.request_id
    assert await total(client, parent) == 1

    batch = pb.BatchCreatePredictionsRequest(
        parent=parent,
        request_id=str(uuid.uuid4()),
        requests=[pb.CreatePredictionRequest(prediction=prediction(i / 10)) for i in range(5)],
    )
    first_batch, second_batch = await asyncio.gather(
        client.predictions.BatchCreatePredictions(batch),
        client.predictions.BatchCreatePredictions(batch),
    )
    assert first_batch == second_batch
    assert {p.request_id for p in first_batch.predictions} == {batch.request_id}
    assert await total(client, parent) == 6


async def test_batch_create_is_atomic_and_names_bad_rows(any_server: RunningServer) -> None:
    parent = await new_org(any_server)
    client = any_server.for_org(org_id(parent))
    items = [prediction(i / 10, subject=f"emp-{i}") for i in range(5)]
    items[3].probability = 2.0
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(
                parent=parent, requests=[pb.CreatePredictionRequest(prediction=p) for p in items]
            )
        )
    assert list(violations(caught.value)) == ["requests[3].prediction.probability"]
    assert await total(client, parent) == 0

    repeated = str(uuid.uuid4())
    other_parent = f"organizations/{uuid.uuid4()}"
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(
                parent=parent,
                requests=[
                    pb.CreatePredictionRequest(prediction=prediction(), prediction_id=repeated),
                    pb.CreatePredictionRequest(parent=other_parent, prediction=prediction()),
                    pb.CreatePredictionRequest(prediction=prediction(), prediction_id=repeated),
                ],
            )
        )
    assert set(violations(caught.value)) == {"requests[1].parent", "requests[2].prediction_id"}
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(parent=parent)
        )
    assert "requests" in violations(caught.value)
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(
                parent=parent,
                requests=[pb.CreatePredictionRequest(prediction=prediction())] * 1001,
            )
        )
    assert "requests" in violations(caught.value)

    items[3].probability = 0.3
    created = await batch_create(client, parent, items)
    assert [p.subject_id for p in created] == [f"emp-{i}" for i in range(5)]
    assert len({p.request_id for p in created}) == 1

    existing_id = created[0].name.rsplit("/", 1)[1]
    with pytest.raises(AlreadyExists):
        await client.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(
                parent=parent,
                requests=[
                    pb.CreatePredictionRequest(prediction=prediction()),
                    pb.CreatePredictionRequest(prediction=prediction(), prediction_id=existing_id),
                ],
            )
        )
    assert await total(client, parent) == 5


async def test_other_tenants_and_scopes_are_refused(db_server: RunningServer) -> None:
    parent_a = await new_org(db_server, "A")
    parent_b = await new_org(db_server, "B")
    client_a = db_server.for_org(org_id(parent_a))
    mine = await client_a.predictions.CreatePrediction(
        pb.CreatePredictionRequest(parent=parent_a, prediction=prediction())
    )
    client_b = db_server.for_org(org_id(parent_b), scope="read write admin")
    calls: list[Awaitable[object]] = [
        client_b.predictions.GetPrediction(pb.GetPredictionRequest(name=mine.name)),
        client_b.predictions.GetPrediction(
            pb.GetPredictionRequest(name=f"{parent_a}/predictions/{uuid.uuid4()}")
        ),
        client_b.predictions.ListPredictions(pb.ListPredictionsRequest(parent=parent_a)),
        client_b.predictions.CreatePrediction(
            pb.CreatePredictionRequest(parent=parent_a, prediction=prediction())
        ),
        client_b.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(
                parent=parent_a, requests=[pb.CreatePredictionRequest(prediction=prediction())]
            )
        ),
        client_b.predictions.GetRiskDistribution(pb.GetRiskDistributionRequest(parent=parent_a)),
        client_b.predictions.GetPredictionStatistics(
            pb.GetPredictionStatisticsRequest(parent=parent_a)
        ),
        client_b.predictions.PurgePredictions(
            pb.PurgePredictionsRequest(parent=parent_a, older_than=duration_pb2.Duration(seconds=1))
        ),
        client_b.predictions.PurgePredictions(
            pb.PurgePredictionsRequest(
                parent="organizations/-", older_than=duration_pb2.Duration(seconds=1)
            )
        ),
        client_b.predictions.ListRequestLogs(pb.ListRequestLogsRequest(parent=parent_a)),
        client_b.predictions.ListRequestLogs(pb.ListRequestLogsRequest(parent="organizations/-")),
    ]
    for call in calls:
        with pytest.raises(PermissionDenied) as denied:
            await call
        assert denied.value.reason == "ORGANIZATION_MISMATCH"
    with pytest.raises(PermissionDenied) as denied:
        async for _ in client_b.predictions.ExportPredictions(
            pb.ExportPredictionsRequest(parent=parent_a)
        ):
            pass
    assert denied.value.reason == "ORGANIZATION_MISMATCH"
    listed_b = await client_b.predictions.ListPredictions(
        pb.ListPredictionsRequest(parent=parent_b)
    )
    assert list(listed_b.predictions) == []

    reader = db_server.for_org(org_id(parent_a), scope="read")
    assert (await reader.predictions.GetPrediction(pb.GetPredictionRequest(name=mine.name))) == mine
    for call in (
        reader.predictions.CreatePrediction(
            pb.CreatePredictionRequest(parent=parent_a, prediction=prediction())
        ),
        reader.predictions.BatchCreatePredictions(
            pb.BatchCreatePredictionsRequest(
                parent=parent_a, requests=[pb.CreatePredictionRequest(prediction=prediction())]
            )
        ),
        client_a.predictions.PurgePredictions(  # read write, but not admin
            pb.PurgePredictionsRequest(parent=parent_a, older_than=duration_pb2.Duration(seconds=1))
        ),
        client_a.predictions.ListRequestLogs(pb.ListRequestLogsRequest(parent=parent_a)),
    ):
        with pytest.raises(PermissionDenied) as denied:
            await call
        assert denied.value.reason == "MISSING_SCOPE"
    assert await total(client_a, parent_a) == 1


async def test_list_filters_orders_and_pages(db_server: RunningServer) -> None:
    parent = await new_org(db_server)
    client = db_server.for_org(org_id(parent))
    items = [
        prediction(
            i / 40,
            subject=f"emp-{i % 3}",
            version=f"v{i % 2}",
            at=NOW - timedelta(minutes=i // 2),  # pairs share a predict_time
        )
        for i in range(40)
    ]
    created = await batch_create(client, parent, items)
    by_name = {p.name: p for p in created}

    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await client.predictions.ListPredictions(
            pb.ListPredictionsRequest(parent=parent, page_size=7, page_token=token)
        )
        assert page.total_size == 40
        seen += [p.name for p in page.predictions]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(by_name)
    times = [by_name[n].predict_time.ToDatetime() for n in seen]
    assert times == sorted(times, reverse=True)

    top = await client.predictions.ListPredictions(
        pb.ListPredictionsRequest(parent=parent, order_by="probability desc", page_size=3)
    )
    assert [p.probability for p in top.predictions] == [39 / 40, 38 / 40, 37 / 40]

    flt = pb.PredictionFilter(
        subject_id="emp-1",
        model_version="v1",
        model_name="attrition",
        risk_level=pb.RISK_LEVEL_MEDIUM,
        min_probability=0.35,
        predict_time_range=common_pb2.TimeRange(
            start_time=ts(NOW - timedelta(minutes=15)), end_time=ts(NOW)
        ),
    )
    filtered = await client.predictions.ListPredictions(
        pb.ListPredictionsRequest(parent=parent, filter=flt, order_by="probability")
    )
    expected = sorted(
        (
            p
            for p in created
            if p.subject_id == "emp-1"
            and p.model_version == "v1"
            and p.risk_level == pb.RISK_LEVEL_MEDIUM
            and p.probability >= 0.35
            and NOW - timedelta(minutes=15) <= p.predict_time.ToDatetime(tzinfo=UTC) < NOW
        ),
        key=lambda p: p.probability,
    )
    assert expected
    assert list(filtered.predictions) == expected
    assert filtered.total_size == len(expected)

    first = await client.predictions.ListPredictions(
        pb.ListPredictionsRequest(parent=parent, page_size=5)
    )
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.ListPredictions(
            pb.ListPredictionsRequest(
                parent=parent, page_size=5, page_token=first.next_page_token, filter=flt
            )
        )
    assert "page_token" in violations(caught.value)
    bad_requests = {
        "page_size": pb.ListPredictionsRequest(parent=parent, page_size=-1),
        "order_by": pb.ListPredictionsRequest(parent=parent, order_by="subject_id"),
        "filter.min_probability": pb.ListPredictionsRequest(
            parent=parent, filter=pb.PredictionFilter(min_probability=1.5)
        ),
        "filter.predict_time_range": pb.ListPredictionsRequest(
            parent=parent,
            filter=pb.PredictionFilter(
                predict_time_range=common_pb2.TimeRange(
                    start_time=ts(NOW), end_time=ts(NOW - timedelta(1))
                )
            ),
        ),
    }
    for field, request in bad_requests.items():
        with pytest.raises(InvalidArgument) as caught:
            await client.predictions.ListPredictions(request)
        assert field in violations(caught.value)


async def test_export_streams_every_row_once(db_server: RunningServer) -> None:
    parent = await new_org(db_server)
    client = db_server.for_org(org_id(parent), scope="read write")
    items = [prediction(i / 3000, at=NOW - timedelta(seconds=i % 100)) for i in range(3000)]
    created = await batch_create(client, parent, items)
    other = await new_org(db_server, "other")
    await batch_create(db_server.for_org(org_id(other)), other, [prediction()])

    reader = db_server.for_org(org_id(parent), scope="read")
    sizes: list[int] = []
    names: list[str] = []
    async for chunk in reader.predictions.ExportPredictions(
        pb.ExportPredictionsRequest(parent=parent)
    ):
        sizes.append(len(chunk.predictions))
        names += [p.name for p in chunk.predictions]
    assert sizes == [500] * 6
    assert len(names) == len(set(names)) == 3000
    assert set(names) == {p.name for p in created}

    high: list[float] = []
    async for chunk in reader.predictions.ExportPredictions(
        pb.ExportPredictionsRequest(
            parent=parent,
            chunk_size=5000,  # lowered to 1000
            order_by="probability desc",
            filter=pb.PredictionFilter(min_probability=0.5),
        )
    ):
        assert len(chunk.predictions) <= 1000
        high += [p.probability for p in chunk.predictions]
    assert len(high) == 1500
    assert high == sorted(high, reverse=True)

    for field, request in {
        "chunk_size": pb.ExportPredictionsRequest(parent=parent, chunk_size=-1),
        "order_by": pb.ExportPredictionsRequest(parent=parent, order_by="create_time"),
    }.items():
        with pytest.raises(InvalidArgument) as caught:
            async for _ in reader.predictions.ExportPredictions(request):
                pass
        assert field in violations(caught.value)


async def test_risk_distribution_and_statistics(any_server: RunningServer) -> None:
    parent = await new_org(any_server)
    client = any_server.for_org(org_id(parent))
    await batch_create(
        client,
        parent,
        [
            prediction(0.1, version="v1"),
            prediction(0.2, version="v1"),
            prediction(0.5, version="v2"),
            prediction(0.8, version="v1", subject="emp-2"),
        ],
    )
    dist = await client.predictions.GetRiskDistribution(
        pb.GetRiskDistributionRequest(parent=parent)
    )
    assert (dist.total_count, dist.low_count, dist.medium_count, dist.high_count) == (4, 2, 1, 1)
    narrowed = await client.predictions.GetRiskDistribution(
        pb.GetRiskDistributionRequest(
            parent=parent, filter=pb.PredictionFilter(risk_level=pb.RISK_LEVEL_LOW)
        )
    )
    assert (narrowed.total_count, narrowed.low_count, narrowed.high_count) == (2, 2, 0)

    stats = await client.predictions.GetPredictionStatistics(
        pb.GetPredictionStatisticsRequest(parent=parent)
    )
    assert stats.count == 4
    assert stats.mean_probability == pytest.approx(0.4)
    assert stats.min_probability == pytest.approx(0.1)
    assert stats.max_probability == pytest.approx(0.8)
    assert [(m.model_name, m.model_version, m.count) for m in stats.model_versions] == [
        ("attrition", "v1", 3),
        ("attrition", "v2", 1),
    ]
    assert stats.model_versions[0].mean_probability == pytest.approx(1.1 / 3)
    empty = await client.predictions.GetPredictionStatistics(
        pb.GetPredictionStatisticsRequest(parent=parent, filter=pb.PredictionFilter(subject_id="x"))
    )
    assert empty.count == 0
    assert not empty.HasField("mean_probability")
    assert not empty.HasField("min_probability")
    with pytest.raises(InvalidArgument) as caught:
        await client.predictions.GetRiskDistribution(
            pb.GetRiskDistributionRequest(parent=parent, filter=pb.PredictionFilter(risk_level=9))  # type: ignore[arg-type]
        )
    assert "filter.risk_level" in violations(caught.value)


async def test_purge_removes_only_old_rows(db_server: RunningServer) -> None:
    parent_a = await new_org(db_server, "A")
    parent_b = await new_org(db_server, "B")
    year = timedelta(days=365)
    old_a = await batch_create(
        db_server.for_org(org_id(parent_a)),
        parent_a,
        [prediction(at=NOW - year - timedelta(days=i + 1)) for i in range(30)],
    )
    young_a = await batch_create(
        db_server.for_org(org_id(parent_a)),
        parent_a,
        [prediction(at=NOW - year + timedelta(days=1)), prediction()],
    )
    await batch_create(
        db_server.for_org(org_id(parent_b)), parent_b, [prediction(at=NOW - 2 * year)]
    )
    admin_a = db_server.for_org(org_id(parent_a), scope="read write admin")
    older_than = duration_pb2.Duration()
    older_than.FromTimedelta(year)

    dry = await admin_a.predictions.PurgePredictions(
        pb.PurgePredictionsRequest(parent=parent_a, older_than=older_than, dry_run=True)
    )
    assert dry.purged_count == len(old_a)
    assert await total(admin_a, parent_a) == 32
    purged = await admin_a.predictions.PurgePredictions(
        pb.PurgePredictionsRequest(parent=parent_a, older_than=older_than)
    )
    assert purged.purged_count == len(old_a)
    left = await admin_a.predictions.ListPredictions(pb.ListPredictionsRequest(parent=parent_a))
    assert {p.name for p in left.predictions} == {p.name for p in young_a}

    admin = db_server.admin()
    everywhere = await admin.predictions.PurgePredictions(
        pb.PurgePredictionsRequest(parent="organizations/-", older_than=older_than)
    )
    assert everywhere.purged_count == 1
    assert await total(admin, parent_b) == 0

    for bad in (
        pb.PurgePredictionsRequest(parent=parent_a),
        pb.PurgePredictionsRequest(parent=parent_a, older_than=duration_pb2.Duration(seconds=-5)),
        pb.PurgePredictionsRequest(parent=parent_a, older_than=duration_pb2.Duration()),
    ):
        with pytest.raises(InvalidArgument) as caught:
            await admin.predictions.PurgePredictions(bad)
        assert "older_than" in violations(caught.value)


async def test_request_log_records_calls(db_server: RunningServer) -> None:
    parent = await new_org(db_server)
    client = db_server.for_org(org_id(parent), subject="logged-caller")
    missing = f"{parent}/predictions/{uuid.uuid4()}"
    with pytest.raises(NotFound):
        await client.predictions.GetPrediction(pb.GetPredictionRequest(name=missing))
    await client.predictions.CreatePrediction(
        pb.CreatePredictionRequest(parent=parent, prediction=prediction())
    )
    admin = db_server.admin()
    get_method = "/ferrule.v1.PredictionService/GetPrediction"
    logs: list[pb.RequestLog] = []

    async def logged() -> bool:  # written in the background
        nonlocal logs
        response = await admin.predictions.ListRequestLogs(
            pb.ListRequestLogsRequest(parent=parent, method=get_method)
        )
        logs = list(response.request_logs)
        return bool(logs)

    await eventually(logged, what="the GetPrediction request log")
    assert len(logs) == 1
    entry = logs[0]
    assert entry.status_code == "NOT_FOUND"
    assert entry.caller == "logged-caller"
    assert entry.peer.startswith("ipv")  # ipv4:127.0.0.1:port or ipv6:[::1]:port
    assert entry.user_agent.startswith("ferrule-client-python/")  # from the call's metadata
    assert entry.request_bytes > 0
    assert entry.name.startswith(f"{parent}/requestLogs/")
    assert entry.create_time.seconds > 0

    everywhere: list[pb.RequestLog] = []

    async def logged_everywhere() -> bool:
        nonlocal everywhere
        response = await admin.predictions.ListRequestLogs(
            pb.ListRequestLogsRequest(
                parent="organizations/-",
                method="/ferrule.v1.PredictionService/CreatePrediction",
                status_code="OK",
                order_by="create_time",
            )
        )
        everywhere = list(response.request_logs)
        return bool(everywhere)

    await eventually(logged_everywhere, what="the CreatePrediction request log")
    assert [e.caller for e in everywhere] == ["logged-caller"]

    with pytest.raises(InvalidArgument) as caught:
        await admin.predictions.ListRequestLogs(
            pb.ListRequestLogsRequest(parent=parent, status_code="NOPE")
        )
    assert "status_code" in violations(caught.value)
    with pytest.raises(InvalidArgument) as caught:
        await admin.predictions.ListRequestLogs(
            pb.ListRequestLogsRequest(parent=parent, order_by="method")
        )
    assert "order_by" in violations(caught.value)


async def test_cached_reads_stay_correct_across_a_purge(db_server: RunningServer) -> None:
    # Until the app wires its cache into Dependencies, install the in-process one here.
    cache = create_cache(None, prefix="test", timeout_ms=50, local_max_entries=1000)
    setattr(db_server.app.deps, "cache", cache)  # noqa: B010
    parent = await new_org(db_server)
    client = db_server.for_org(org_id(parent), scope="read write admin")
    old = await client.predictions.CreatePrediction(
        pb.CreatePredictionRequest(
            parent=parent, prediction=prediction(0.9, at=NOW - timedelta(days=30))
        )
    )
    for _ in range(2):
        assert await client.predictions.GetPrediction(pb.GetPredictionRequest(name=old.name)) == old
        stats = await client.predictions.GetPredictionStatistics(
            pb.GetPredictionStatisticsRequest(parent=parent)
        )
        assert stats.count == 1
    assert cache.stats().hits >= 2
    older_than = duration_pb2.Duration()
    older_than.FromTimedelta(timedelta(days=1))
    purged = await client.predictions.PurgePredictions(
        pb.PurgePredictionsRequest(parent=parent, older_than=older_than)
    )
    assert purged.purged_count == 1
    with pytest.raises(NotFound):
        await client.predictions.GetPrediction(pb.GetPredictionRequest(name=old.name))
