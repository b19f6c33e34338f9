"""Tracing cost: GetUser RPC/s and server CPU per call with tracing off, sampled, on with a
no-op exporter, and on with OTLP.

One server subprocess per mode on one fresh database (same users, same Zipf load as the
read scenario, cache as ``--tracing-cache`` says):

* **off**: no ``OTEL_*`` exporter, so no SDK provider: non-recording spans;
* **otlp_sampled_1pct**: the production setting docs/sre.md recommends,
  ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG=0.01``
  (every call starts a trace id, one in a hundred is recorded and exported as **otlp**);
* **otlp_sampled_10pct**: the same at 0.1;
* **noop**: every span recorded by the SDK (BatchSpanProcessor included), but its
  exporter drops every batch (``bench/_noop_tracing_server.py``): nothing encoded;
* **otlp**: every call sampled, ``OTEL_TRACES_EXPORTER=otlp`` over gRPC: the SDK's
  BatchSpanProcessor (default batch settings) and OTLP exporter, to a real OTLP endpoint
  in another process (``bench/_otlp_sink.py``, which counts and drops the spans: each
  mode's count is reported against the calls answered, so a dropped span shows).

Metrics export stays off in every mode. Each round runs ``off`` and then the traced modes
(in reverse order every other round); one more ``off`` closes the last round. Rates and
CPU are medians over rounds; ``{mode}_paired_overhead`` (rate) and
``{mode}_paired_cpu_overhead`` (server CPU per call, the children's included) are medians
over rounds of the ratio against the mean of the ``off`` runs just before and just after,
which cancels the machine's slower drifts. On a shared machine the rate moves with how
much CPU the client and PostgreSQL got; the CPU per call moves less.

Then each traced mode runs **side by side** with ``off``: one load, its calls sent to
the two servers alternately, both servers' CPU measured over the same window, so both
pay the same moment of a busy machine. ``{mode}_side_by_side_cpu_overhead`` is the median
over those rounds of the ratio of their server CPU per call: the steadiest figure here
for an overhead of a few percent (the rate is the same for both by construction).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import psutil

from bench.harness import ROOT, fresh_database, org_token, server_process
from bench.loadgen import (
    Call,
    LoadResult,
    median_result,
    process_cpu_seconds,
    run_load,
    seed_users,
    zipf_indexes,
)
from bench.reads import (
    REDIS_URL,
    delete_prefix,
    describe,
    get_user_call,
    reader,
    server_us_per_call,
)
from bench.registry import Figures, Scenario
from ferrule.v1 import user_service_pb2 as user_pb

#: The sampling ratio of each mode (1 for every call), and what its server adds to the
#: environment; ``off`` has no exporter.
MODES: dict[str, tuple[float, dict[str, str]]] = {
    "off": (0.0, {}),
    "otlp_sampled_1pct": (0.01, {}),
    "otlp_sampled_10pct": (0.1, {}),
    "noop": (1.0, {}),
    "otlp": (1.0, {}),
}
#: Spans per GetUser with every RPC sampled: the server span and the point read's SELECT.
SPANS_PER_CALL = 2


def counted(call: Call, tally: list[int]) -> Call:
    """``call`` that counts its successes in ``tally[0]`` (warm-up included): the spans
    the server should have exported."""

    async def counting(i: int) -> object:
        result = await call(i)
        tally[0] += 1
        return result

    return counting


async def side_by_side(
    calls: tuple[Call, Call], pids: tuple[int, int], *, seconds: float, concurrency: int
) -> tuple[float, float]:
    """Server CPU per call (us) of two servers loaded at once, call for call alternately:
    both see the same moment of a shared machine, which sequential windows cannot give."""
    counter = itertools.count()
    counts = [0, 0]
    measuring = stop = False

    async def worker() -> None:
        while not stop:
            i = next(counter)
            side = i % 2
            with contextlib.suppress(Exception):  # an error is a call not counted
                await calls[side](i // 2)
                if measuring:
                    counts[side] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(0.5)
        processes = [psutil.Process(pid) for pid in pids]
        before = [process_cpu_seconds(process) for process in processes]
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        after = [process_cpu_seconds(process) for process in processes]
    finally:
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
    first, second = ((after[k] - before[k]) / max(counts[k], 1) * 1e6 for k in (0, 1))
    return first, second


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--tracing-users", type=int, default=10_000)
    parser.add_argument("--tracing-concurrency", type=int, default=16)
    parser.add_argument(
        "--tracing-seconds", type=float, default=float(env("BENCH_TRACING_SECONDS", "4"))
    )
    parser.add_argument("--tracing-rounds", type=int, default=int(env("BENCH_TRACING_ROUNDS", "3")))
    parser.add_argument(
        "--tracing-modes",
        default=env("BENCH_TRACING_MODES", ",".join(MODES)),
        help="comma-separated modes to run (off is always run): fewer modes, closer pairs",
    )
    parser.add_argument(
        "--tracing-side-by-side-rounds",
        type=int,
        default=int(env("BENCH_TRACING_SIDE_BY_SIDE_ROUNDS", "5")),
        help="rounds of each traced mode loaded at the same time as off, call for call",
    )
    parser.add_argument(
        "--tracing-cache", choices=("redis", "off"), default="off",
        help="off (default): every GetUser reaches PostgreSQL, so each trace has its SQL"
        " spans; redis: the production read path (mostly cache-hit spans)",
    )  # fmt: skip


@contextlib.asynccontextmanager
async def otlp_sink() -> AsyncIterator[tuple[int, dict[str, int]]]:
    """The sink subprocess; yields its port and a dict that receives the span count per
    ``service.name``."""
    process = subprocess.Popen(  # noqa: ASYNC220 (started once)
        [sys.executable, "-m", "bench._otlp_sink"], cwd=ROOT, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    loop = asyncio.get_running_loop()
    received: dict[str, int] = {}
    try:
        line = await asyncio.wait_for(loop.run_in_executor(None, process.stdout.readline), 30)
        port = int(line.split()[1])
        yield port, received
    finally:
        process.terminate()
        out, _ = await loop.run_in_executor(None, process.communicate)
        for text in out.decode().splitlines():
            if text.startswith("spans "):
                _, service, count = text.split()
                received[service] = int(count)


async def run(args: argparse.Namespace) -> Figures:
    users, concurrency, seconds = args.tracing_users, args.tracing_concurrency, args.tracing_seconds
    prefix = f"ferrule-bench-{uuid.uuid4().hex[:10]}"
    cache = (
        {"REDIS_URL": REDIS_URL, "FERRULE_CACHE_PREFIX": prefix}
        if args.tracing_cache == "redis"
        else {"FERRULE_CACHE_ENABLED": "false"}
    )
    base = {"DATABASE_APP_ROLE": "ferrule_app", "OTEL_METRICS_EXPORTER": "none", **cache}
    asked = {mode.strip() for mode in args.tracing_modes.split(",") if mode.strip()}
    if asked - set(MODES):
        raise SystemExit(f"unknown tracing modes {sorted(asked - set(MODES))}: {', '.join(MODES)}")
    modes = ["off", *(mode for mode in MODES if mode != "off" and mode in asked)]
    rounds: dict[str, list[LoadResult]] = {mode: [] for mode in modes}
    closing_off: LoadResult | None = None
    calls_made: dict[str, list[int]] = {mode: [0] for mode in modes}
    side_by_side_cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        async with otlp_sink() as (port, received):
            otlp_env = {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            }
            async with contextlib.AsyncExitStack() as stack:
                database_url = await stack.enter_async_context(fresh_database())
                servers = {}
                for mode in modes:
                    ratio, extra = MODES[mode]
                    module = "bench._noop_tracing_server" if mode == "noop" else "server"
                    env = {**base, **(otlp_env if mode.startswith("otlp") else {}), **extra}
                    if 0 < ratio < 1:
                        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
                        env["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
                    servers[mode] = await stack.enter_async_context(
                        server_process(database_url, module, OTEL_SERVICE_NAME=mode, **env)
                    )
                organization = await servers["off"].create_organization("tracing")
                ids = await seed_users(database_url, organization, users)
                requests = [
                    user_pb.GetUserRequest(name=f"organizations/{organization}/users/{ids[k]}")
                    for k in zipf_indexes(users, 1.1, 200_000)
                ]
                token = org_token(organization, scope="read")
                plan = []
                for mode in modes:
                    client = await stack.enter_async_context(reader(servers[mode], token))
                    call = counted(get_user_call(client, requests), calls_made[mode])
                    plan.append((mode, call, servers[mode].pid))
                for _, call, pid in plan:  # warm-up
                    await run_load(call, seconds=1.0, concurrency=concurrency, server_pid=pid)
                for number in range(args.tracing_rounds):
                    # Every other round runs the traced modes in reverse, so that no mode
                    # is always the one measured right after (or long after) ``off``.
                    traced = plan[1:] if number % 2 == 0 else plan[:0:-1]
                    for mode, call, pid in [plan[0], *traced]:
                        result = await run_load(
                            call, seconds=seconds, concurrency=concurrency, server_pid=pid
                        )
                        rounds[mode].append(result)
                        print(f"[round {number + 1}] {describe(mode, result)}", flush=True)
                # Closes the last round, so that every round has an ``off`` on each side.
                _, off_call, off_pid = plan[0]
                closing_off = await run_load(
                    off_call, seconds=seconds, concurrency=concurrency, server_pid=off_pid
                )
                print(f"[closing] {describe('off', closing_off)}", flush=True)
                for mode, call, pid in plan[1:]:
                    for number in range(args.tracing_side_by_side_rounds):
                        off_us, mode_us = await side_by_side(
                            (off_call, call),
                            (off_pid, pid),
                            seconds=seconds,
                            concurrency=concurrency,
                        )
                        side_by_side_cpu[mode].append(mode_us / off_us - 1)
                        print(
                            f"[side by side {number + 1}] off {off_us:.0f} us/call,"
                            f" {mode} {mode_us:.0f} us/call",
                            flush=True,
                        )
    finally:
        if args.tracing_cache == "redis":
            with contextlib.suppress(Exception):
                await delete_prefix(prefix)
    assert closing_off is not None
    best = {mode: median_result(results) for mode, results in rounds.items()}
    base_rate = best["off"].rps
    figures: Figures = {"cache": args.tracing_cache, "concurrency": concurrency}
    for mode in modes:
        result = best[mode]
        overhead = 1 - result.rps / base_rate
        cpu_us = result.server_cpu / result.rps * 1e6 if result.rps else 0.0
        print(
            f"{describe(f'tracing {mode}', result)}  overhead {overhead:6.1%}"
            f"  server CPU {cpu_us:.0f} us/call",
            flush=True,
        )
        figures[f"{mode}_rps"] = round(result.rps)
        figures[f"{mode}_p50_ms"] = round(result.p50_ms, 3)
        figures[f"{mode}_p99_ms"] = round(result.p99_ms, 3)
        figures[f"{mode}_server_cpu_us_per_call"] = round(cpu_us)
        if mode != "off":
            offs = [*rounds["off"], closing_off]
            paired = statistics.median(
                1 - result.rps / ((before.rps + after.rps) / 2)
                for result, before, after in zip(rounds[mode], offs, offs[1:], strict=False)
            )
            paired_cpu = statistics.median(
                server_us_per_call(result)
                / ((server_us_per_call(before) + server_us_per_call(after)) / 2)
                - 1
                for result, before, after in zip(rounds[mode], offs, offs[1:], strict=False)
            )
            print(
                f"  {mode}: paired overhead (median over rounds, against the off runs on"
                f" either side) {paired:.1%} of the rate, {paired_cpu:+.1%} server CPU per call"
            )
            figures[f"{mode}_paired_overhead"] = round(paired, 3)
            if side_by_side_cpu[mode]:
                together = statistics.median(side_by_side_cpu[mode])
                print(
                    f"  {mode}: side by side with off (median of"
                    f" {len(side_by_side_cpu[mode])} rounds) {together:+.1%} server CPU per call"
                )
                figures[f"{mode}_side_by_side_cpu_overhead"] = round(together, 3)
            figures[f"{mode}_paired_cpu_overhead"] = round(paired_cpu, 3)
            figures[f"{mode}_overhead"] = round(overhead, 3)
            base_cpu = best["off"].server_cpu / base_rate * 1e6
            figures[f"{mode}_cpu_overhead"] = round(cpu_us / base_cpu - 1, 3)
    for mode in modes:
        if not mode.startswith("otlp"):
            continue
        # Calls the server answered (warm-up and the gaps between windows included), so
        # a shortfall means spans dropped on the way (a full queue), not spans not made.
        expected = round(SPANS_PER_CALL * calls_made[mode][0] * MODES[mode][0])
        got = received.get(mode, 0)
        print(
            f"  {mode}: spans received by the OTLP sink {got:,} of ~{expected:,}"
            " (2 per call answered, times the sampling ratio)",
            flush=True,
        )
        figures[f"{mode}_spans_received"] = got
        figures[f"{mode}_spans_expected"] = expected
    return figures


SCENARIO = Scenario(
    name="tracing",
    run=run,
    add_arguments=add_arguments,
    description="GetUser RPC/s with tracing off, sampled (1%, 10%), on (no-op exporter), on (OTLP)",
)
