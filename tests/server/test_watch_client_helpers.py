"""The client's watch helpers: every state until the final one, across a server restart
(asyncio), and the same through the blocking client; the predictions tail, each row once
across a restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from google.protobuf import field_mask_pb2

from ferrule.client import (
    AsyncFerruleClient,
    ClientConfig,
    FerruleClient,
    NotFound,
    awatch_analysis,
    awatch_predictions,
    watch_analysis,
    watch_batch,
    watch_predictions,
)
from ferrule.v1 import analysis_service_pb2 as pb
from ferrule.v1 import prediction_service_pb2 as ppb
from tests.polling import eventually
from tests.server.conftest import StartServer, make_token
from tests.server.process_helpers import free_port
from tests.server.test_analysis_service import _org, create, set_state
from tests.server.test_prediction_service import batch_create
from tests.server.test_watch_predictions import mixed

WAIT_S = 60.0


async def test_awatch_analysis_resumes_across_a_server_restart(
    start_server: StartServer, sqlite_database_url: str
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    first_server = await start_server(sqlite_database_url, ferrule_listen=listen)
    org = await _org(first_server)
    created = await create(org, f"restart {uuid.uuid4()}")
    config = ClientConfig(target=listen, token=make_token(org.id))
    async with AsyncFerruleClient(config=config) as client:
        states = awatch_analysis(client, created.name, initial_backoff=0.05)
        first = await asyncio.wait_for(anext(states), WAIT_S)
        assert first.state == pb.ANALYSIS_STATE_PENDING

        await first_server.app.stop(grace=0)  # the stream breaks (UNAVAILABLE)
        second_server = await start_server(sqlite_database_url, ferrule_listen=listen)
        writer = second_server.for_org(org.id)
        processing = await writer.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(
                analysis=pb.Analysis(name=created.name, state=pb.ANALYSIS_STATE_PROCESSING),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        )
        after_restart = await asyncio.wait_for(anext(states), WAIT_S)
        assert after_restart.etag == processing.etag  # the pending state is not repeated

        await writer.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(
                analysis=pb.Analysis(name=created.name, state=pb.ANALYSIS_STATE_COMPLETED),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        )
        rest = await asyncio.wait_for(_drain(states), WAIT_S)
        assert [a.state for a in rest] == [pb.ANALYSIS_STATE_COMPLETED]


async def _drain(states: object) -> list[pb.Analysis]:
    return [state async for state in states]  # type: ignore[attr-defined]


async def test_blocking_watch_helpers_follow_to_the_final_state(
    start_server: StartServer, sqlite_database_url: str
) -> None:
    server = await start_server(sqlite_database_url)
    org = await _org(server)
    batch = await org.client.analyses.CreateBatch(
        pb.CreateBatchRequest(parent=org.parent, batch=pb.AnalysisBatch(display_name="b"))
    )
    created = await create(org, f"sync {uuid.uuid4()}", batch=batch.name)
    analysis_states: list[pb.Analysis] = []
    batch_states: list[pb.AnalysisBatch] = []

    def follow() -> None:
        with FerruleClient(
            config=ClientConfig(target=server.target, token=make_token(org.id))
        ) as c:
            for state in watch_analysis(c, created.name):
                analysis_states.append(state)
            batch_states.extend(watch_batch(c, batch.name))  # already final: one state

    def follow_missing() -> None:
        with FerruleClient(
            config=ClientConfig(target=server.target, token=make_token(org.id))
        ) as c:
            list(watch_analysis(c, f"{org.parent}/analyses/{uuid.uuid4()}"))

    follower = asyncio.create_task(asyncio.to_thread(follow))
    await eventually(lambda: analysis_states, what="the first state")
    await set_state(org, created.name, pb.ANALYSIS_STATE_PROCESSING)
    await set_state(org, created.name, pb.ANALYSIS_STATE_FAILED, error_message="no")
    await asyncio.wait_for(follower, WAIT_S)
    assert analysis_states[0].state == pb.ANALYSIS_STATE_PENDING
    assert analysis_states[-1].state == pb.ANALYSIS_STATE_FAILED
    assert [b.state for b in batch_states] == [pb.BATCH_STATE_COMPLETED_WITH_FAILURES]
    try:
        await asyncio.to_thread(follow_missing)
    except NotFound:
        pass
    else:
        raise AssertionError("a missing analysis is NOT_FOUND, not retried")


async def test_watch_predictions_helpers_resume_across_a_server_restart_exactly_once(
    start_server: StartServer, sqlite_database_url: str
) -> None:
    """awatch_predictions follows the tail through a server restart (its stream breaks
    with UNAVAILABLE and reopens from the last cursor): each row once; watch_predictions
    (blocking) delivers the same rows from the same starting cursor."""
    listen = f"127.0.0.1:{free_port()}"
    first_server = await start_server(sqlite_database_url, ferrule_listen=listen)
    org = await _org(first_server)
    start = await anext(
        aiter(
            org.client.predictions.WatchPredictions(
                ppb.WatchPredictionsRequest(parent=org.parent), timeout=WAIT_S
            )
        )
    )
    config = ClientConfig(target=listen, token=make_token(org.id))
    written: list[str] = []
    received: list[str] = []

    async def read_until(
        count: int, responses: AsyncIterator[ppb.WatchPredictionsResponse]
    ) -> None:
        while len(received) < count:
            response = await asyncio.wait_for(anext(responses), WAIT_S)
            received.extend(p.name for p in response.predictions)

    async with AsyncFerruleClient(config=config) as client:
        responses = awatch_predictions(
            client, org.parent, cursor=start.cursor, initial_backoff=0.05
        )
        written += [p.name for p in await batch_create(org.client, org.parent, mixed(10, "a"))]
        await read_until(10, responses)
        await first_server.app.stop(grace=0)  # the stream breaks (UNAVAILABLE)
        second_server = await start_server(sqlite_database_url, ferrule_listen=listen)
        writer = second_server.for_org(org.id)
        written += [p.name for p in await batch_create(writer, org.parent, mixed(10, "b"))]
        await read_until(20, responses)
    assert sorted(received) == sorted(written) and len(set(received)) == 20

    def follow() -> list[str]:
        names: list[str] = []
        with FerruleClient(config=ClientConfig(target=listen, token=make_token(org.id))) as c:
            for response in watch_predictions(c, org.parent, cursor=start.cursor):
                names += [p.name for p in response.predictions]
                if len(names) >= 20:
                    return names
        raise AssertionError("the tail has no end")

    assert sorted(await asyncio.wait_for(asyncio.to_thread(follow), WAIT_S)) == sorted(written)
