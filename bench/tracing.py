"""Tracing cost: GetUser RPC/s with tracing off, on with a no-op exporter, on with OTLP.

Three server subprocesses on one fresh database (same users, same Zipf load as the read
scenario, cache as ``--tracing-cache`` says):

* **off**: no ``OTEL_*`` exporter, so no SDK provider: non-recording spans;
* **noop**: the SDK TracerProvider with a BatchSpanProcessor whose exporter drops every
  batch (``bench/_noop_tracing_server.py``): every span recorded, nothing encoded;
* **otlp**: ``OTEL_TRACES_EXPORTER=otlp`` over gRPC (BatchSpanProcessor, the SDK's
  default batch settings) to a real OTLP endpoint in another process
  (``bench/_otlp_sink.py``, which counts and drops the spans; the count is reported
  so the export is seen to happen), encoded and sent by the server's span export
  process (server/telemetry/span_process.py), as deployed by default;
* **otlp_in_process**: the same with ``FERRULE_TRACE_EXPORT_PROCESS=false``: the SDK's
  exporter encodes in the serving process;
* **otlp_sdk_spans**: **otlp** with ``FERRULE_FAST_SPANS=false``: spans recorded by the
  SDK's own Tracer instead of Ferrule's (server/telemetry/span_recorder.py).

Spans are recorded by Ferrule's tracer in every mode but the last. Metrics export stays
off in all five.

Rounds interleave the servers (off, noop, otlp, ..., off, ...), figures are medians,
and the overhead is ``1 - rate / off rate``. ``{mode}_paired_overhead`` is the median over
rounds of the same ratio taken within each round (each mode against the ``off``
measurement seconds before it), which cancels the machine's slower drifts. Server CPU
per call is also given: on a shared machine it moves less than the rates do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

from bench.harness import ROOT, fresh_database, org_token, server_process
from bench.loadgen import LoadResult, median_result, run_load, seed_users, zipf_indexes
from bench.reads import REDIS_URL, delete_prefix, describe, get_user_call, reader
from bench.registry import Figures, Scenario
from ferrule.v1 import user_service_pb2 as user_pb

MODES = ("off", "noop", "otlp", "otlp_in_process", "otlp_sdk_spans")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--tracing-users", type=int, default=10_000)
    parser.add_argument("--tracing-concurrency", type=int, default=16)
    parser.add_argument(
        "--tracing-seconds", type=float, default=float(env("BENCH_TRACING_SECONDS", "4"))
    )
    parser.add_argument("--tracing-rounds", type=int, default=int(env("BENCH_TRACING_ROUNDS", "3")))
    parser.add_argument(
        "--tracing-cache", choices=("redis", "off"), default="off",
        help="off (default): every GetUser reaches PostgreSQL, so each trace has its SQL"
        " spans; redis: the production read path (mostly cache-hit spans)",
    )  # fmt: skip


@contextlib.asynccontextmanager
async def otlp_sink() -> AsyncIterator[tuple[int, list[int]]]:
    """The sink subprocess; yields its port and a list that receives the span count."""
    process = subprocess.Popen(  # noqa: ASYNC220 (started once)
        [sys.executable, "-m", "bench._otlp_sink"], cwd=ROOT, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    loop = asyncio.get_running_loop()
    received: list[int] = []
    try:
        line = await asyncio.wait_for(loop.run_in_executor(None, process.stdout.readline), 30)
        port = int(line.split()[1])
        yield port, received
    finally:
        process.terminate()
        out, _ = await loop.run_in_executor(None, process.communicate)
        for text in out.decode().splitlines():
            if text.startswith("spans "):
                received.append(int(text.split()[1]))


async def run(args: argparse.Namespace) -> Figures:
    users, concurrency, seconds = args.tracing_users, args.tracing_concurrency, args.tracing_seconds
    prefix = f"ferrule-bench-{uuid.uuid4().hex[:10]}"
    cache = (
        {"REDIS_URL": REDIS_URL, "FERRULE_CACHE_PREFIX": prefix}
        if args.tracing_cache == "redis"
        else {"FERRULE_CACHE_ENABLED": "false"}
    )
    base = {"DATABASE_APP_ROLE": "ferrule_app", "OTEL_METRICS_EXPORTER": "none", **cache}
    rounds: dict[str, list[LoadResult]] = {mode: [] for mode in MODES}
    try:
        async with otlp_sink() as (port, received):
            otlp_env = {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            }
            async with (
                fresh_database() as database_url,
                server_process(database_url, **base) as off,
                server_process(database_url, "bench._noop_tracing_server", **base) as noop,
                server_process(database_url, **otlp_env, **base) as otlp,
                server_process(
                    database_url, FERRULE_TRACE_EXPORT_PROCESS="false", **otlp_env, **base
                ) as otlp_in_process,
                server_process(
                    database_url, FERRULE_FAST_SPANS="false", **otlp_env, **base
                ) as otlp_sdk_spans,
            ):
                organization = await off.create_organization("tracing")
                ids = await seed_users(database_url, organization, users)
                requests = [
                    user_pb.GetUserRequest(name=f"organizations/{organization}/users/{ids[k]}")
                    for k in zipf_indexes(users, 1.1, 200_000)
                ]
                token = org_token(organization, scope="read")
                servers = {
                    "off": off,
                    "noop": noop,
                    "otlp": otlp,
                    "otlp_in_process": otlp_in_process,
                    "otlp_sdk_spans": otlp_sdk_spans,
                }
                async with contextlib.AsyncExitStack() as stack:
                    plan = []
                    for mode in MODES:
                        client = await stack.enter_async_context(reader(servers[mode], token))
                        plan.append((mode, get_user_call(client, requests), servers[mode].pid))
                    for _, call, pid in plan:  # warm-up
                        await run_load(call, seconds=1.0, concurrency=concurrency, server_pid=pid)
                    for number in range(args.tracing_rounds):
                        for mode, call, pid in plan:
                            result = await run_load(
                                call, seconds=seconds, concurrency=concurrency, server_pid=pid
                            )
                            rounds[mode].append(result)
                            print(f"[round {number + 1}] {describe(mode, result)}", flush=True)
    finally:
        if args.tracing_cache == "redis":
            with contextlib.suppress(Exception):
                await delete_prefix(prefix)
    best = {mode: median_result(results) for mode, results in rounds.items()}
    base_rate = best["off"].rps
    figures: Figures = {"cache": args.tracing_cache, "concurrency": concurrency}
    for mode in MODES:
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
            paired = statistics.median(
                1 - result.rps / off.rps
                for result, off in zip(rounds[mode], rounds["off"], strict=True)
            )
            print(f"  {mode}: paired overhead (median of per-round ratios) {paired:.1%}")
            figures[f"{mode}_paired_overhead"] = round(paired, 3)
            figures[f"{mode}_overhead"] = round(overhead, 3)
            base_cpu = best["off"].server_cpu / base_rate * 1e6
            figures[f"{mode}_cpu_overhead"] = round(cpu_us / base_cpu - 1, 3)
    figures["otlp_spans_received"] = received[0] if received else -1
    print(f"spans received by the OTLP sink: {figures['otlp_spans_received']}", flush=True)
    return figures


SCENARIO = Scenario(
    name="tracing",
    run=run,
    add_arguments=add_arguments,
    description="GetUser RPC/s with tracing off, on (no-op exporter) and on (OTLP batch)",
)
