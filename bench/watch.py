"""Watch scenario: fan-out of one committed change to 1,000 watchers on PostgreSQL.

Two server processes on one database: 1,000 ``WatchAnalysis`` streams of one analysis
held open on process A (over ten connections, as ``FERRULE_MAX_STREAMS_PER_CONNECTION``
allows 100 each), and the change written through process B with UpdateAnalysis. Each
round changes ``model_used`` once and records, for every watcher, when the new state
arrived, counted from the moment the UpdateAnalysis request was sent; the time of the
UpdateAnalysis call itself (its commit is inside it) is printed beside, as the
reference. Delivery includes NOTIFY, A's LISTEN connection, 1,000 re-reads on A, and
the bench client (one event loop) receiving 1,000 messages.

Then the predictions tail: ``--watch-tail-watchers`` ``WatchPredictions`` streams (filter
HIGH) on process A, and per round one BatchCreatePredictions of 10 HIGH rows through B;
the same figures, from the request to each watcher's receipt of the rows (NOTIFY, a
horizon and a tail read per watcher on A).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections import defaultdict

from google.protobuf import field_mask_pb2

from bench.harness import fresh_database, org_token, server_process
from bench.registry import Figures, Scenario
from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import analysis_service_pb2 as pb
from ferrule.v1 import prediction_service_pb2 as ppb

PER_CONNECTION = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watch-watchers", type=int, default=1000)
    parser.add_argument("--watch-rounds", type=int, default=10)
    parser.add_argument("--watch-tail-watchers", type=int, default=100)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> Figures:
    watchers, rounds = args.watch_watchers, args.watch_rounds
    limits = {
        "FERRULE_MAX_WATCHES": str(watchers),
        "FERRULE_MAX_WATCHES_PER_CALLER": str(watchers),
        "FERRULE_MAX_CONCURRENT_RPCS": str(watchers + 64),
    }
    async with (
        fresh_database() as database_url,
        server_process(database_url, **limits) as watching,
        server_process(database_url) as writing,
    ):
        organization = await watching.create_organization("watch")
        parent = f"organizations/{organization}"
        token = org_token(organization)
        writer = writing.client(token)
        readers = [
            AsyncFerruleClient(
                config=ClientConfig(
                    target=watching.target,
                    token=token,
                    default_timeout=None,
                    options=(("grpc.use_local_subchannel_pool", 1),),
                )
            )
            for _ in range((watchers + PER_CONNECTION - 1) // PER_CONNECTION)
        ]
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(writer)
            for reader in readers:
                await stack.enter_async_context(reader)
            analysis = await writer.analyses.CreateAnalysis(
                pb.CreateAnalysisRequest(
                    parent=parent,
                    analysis=pb.Analysis(text="watched", analysis_type=pb.ANALYSIS_TYPE_SENTIMENT),
                )
            )
            arrivals: dict[str, list[float]] = defaultdict(list)
            complete: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

            async def watch(reader: AsyncFerruleClient) -> None:
                stream = reader.analyses.WatchAnalysis(pb.WatchAnalysisRequest(name=analysis.name))
                async for state in stream:
                    heard = arrivals[state.model_used]
                    heard.append(time.perf_counter())
                    if len(heard) == watchers:
                        complete[state.model_used].set()

            tasks = [asyncio.create_task(watch(readers[i % len(readers)])) for i in range(watchers)]
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(complete[""].wait(), 120)  # every first state
                if len(arrivals[""]) < watchers:
                    raise RuntimeError(f"only {len(arrivals[''])} of {watchers} watches opened")
                p50s, p99s, maxes, writes = [], [], [], []
                for r in range(rounds):
                    tag = f"round-{r}"
                    sent = time.perf_counter()
                    await writer.analyses.UpdateAnalysis(
                        pb.UpdateAnalysisRequest(
                            analysis=pb.Analysis(name=analysis.name, model_used=tag),
                            update_mask=field_mask_pb2.FieldMask(paths=["model_used"]),
                        )
                    )
                    writes.append((time.perf_counter() - sent) * 1000)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(complete[tag].wait(), 60)
                    got = [(t - sent) * 1000 for t in arrivals[tag]]
                    if len(got) < watchers:
                        raise RuntimeError(f"{tag}: {len(got)} of {watchers} watchers heard it")
                    p50s.append(statistics.median(got))
                    p99s.append(_percentile(got, 0.99))
                    maxes.append(max(got))
                    print(
                        f"  {tag}: update {writes[-1]:7.2f} ms; delivered to all {watchers}: "
                        f"p50 {p50s[-1]:7.2f} ms  p99 {p99s[-1]:7.2f} ms  max {maxes[-1]:7.2f} ms",
                        flush=True,
                    )
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            tail = await _tail_rounds(writer, readers, parent, args.watch_tail_watchers, rounds)
    figures: Figures = {
        "watchers": watchers,
        "rounds": rounds,
        "update_ms_median": round(statistics.median(writes), 2),
        "delivery_p50_ms_median": round(statistics.median(p50s), 2),
        "delivery_p99_ms_median": round(statistics.median(p99s), 2),
        "delivery_max_ms_median": round(statistics.median(maxes), 2),
        "delivery_max_ms_worst": round(max(maxes), 2),
    }
    print(
        f"watch fan-out: {watchers} watchers, median of {rounds} rounds: UpdateAnalysis "
        f"{figures['update_ms_median']} ms; last watcher served "
        f"{figures['delivery_max_ms_median']} ms after the request was sent",
        flush=True,
    )
    figures.update(tail)
    return figures


async def _tail_rounds(
    writer: AsyncFerruleClient,
    readers: list[AsyncFerruleClient],
    parent: str,
    watchers: int,
    rounds: int,
) -> Figures:
    high = ppb.PredictionFilter(risk_level=ppb.RISK_LEVEL_HIGH)
    arrivals: dict[str, list[float]] = defaultdict(list)
    complete: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
    opened: list[float] = []
    all_open = asyncio.Event()

    async def tail(reader: AsyncFerruleClient) -> None:
        request = ppb.WatchPredictionsRequest(parent=parent, filter=high)
        async for response in reader.predictions.WatchPredictions(request):
            now = time.perf_counter()
            if not response.predictions:  # the first response: the watch is established
                opened.append(now)
                if len(opened) == watchers:
                    all_open.set()
                continue
            for tag in {p.subject_id for p in response.predictions}:
                heard = arrivals[tag]
                heard.append(now)
                if len(heard) == watchers:
                    complete[tag].set()

    tasks = [asyncio.create_task(tail(readers[i % len(readers)])) for i in range(watchers)]
    p50s, p99s, maxes, writes = [], [], [], []
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_open.wait(), 120)
        if len(opened) < watchers:
            raise RuntimeError(f"only {len(opened)} of {watchers} tails opened")
        for r in range(rounds):
            tag = f"tail-{r}"
            rows = [
                ppb.CreatePredictionRequest(
                    prediction=ppb.Prediction(
                        subject_id=tag,
                        probability=0.9,
                        risk_level=ppb.RISK_LEVEL_HIGH,
                        model_name="bench",
                        model_version="v1",
                    )
                )
                for _ in range(10)
            ]
            sent = time.perf_counter()
            await writer.predictions.BatchCreatePredictions(
                ppb.BatchCreatePredictionsRequest(parent=parent, requests=rows)
            )
            writes.append((time.perf_counter() - sent) * 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(complete[tag].wait(), 60)
            got = [(t - sent) * 1000 for t in arrivals[tag]]
            if len(got) < watchers:
                raise RuntimeError(f"{tag}: {len(got)} of {watchers} tails received it")
            p50s.append(statistics.median(got))
            p99s.append(_percentile(got, 0.99))
            maxes.append(max(got))
            print(
                f"  {tag}: batch create {writes[-1]:7.2f} ms; delivered to all {watchers}: "
                f"p50 {p50s[-1]:7.2f} ms  p99 {p99s[-1]:7.2f} ms  max {maxes[-1]:7.2f} ms",
                flush=True,
            )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    figures: Figures = {
        "tail_watchers": watchers,
        "tail_write_ms_median": round(statistics.median(writes), 2),
        "tail_delivery_p50_ms_median": round(statistics.median(p50s), 2),
        "tail_delivery_p99_ms_median": round(statistics.median(p99s), 2),
        "tail_delivery_max_ms_worst": round(max(maxes), 2),
    }
    print(
        f"predictions tail: {watchers} watchers, median of {rounds} rounds: "
        f"BatchCreatePredictions {figures['tail_write_ms_median']} ms; delivery p50 "
        f"{figures['tail_delivery_p50_ms_median']} ms, p99 "
        f"{figures['tail_delivery_p99_ms_median']} ms after the request was sent",
        flush=True,
    )
    return figures


SCENARIO = Scenario(
    name="watch",
    run=run,
    add_arguments=add_arguments,
    description="WatchAnalysis fan-out: one change committed through process B, 1,000 "
    "watchers on process A (PostgreSQL NOTIFY/LISTEN); then the WatchPredictions tail",
)
