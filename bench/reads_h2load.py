"""The read scenario's first view: GetUser driven by h2load against two yardsticks.

Four servers on one fresh database, each one process (one core at most), the same row
read by each, interleaved over ``--reads-rounds`` rounds so that drift on a shared
machine hits all four alike:

* **bare**: a grpc.aio server answering a prebuilt User (``bench/_reference_server.py``):
  the framework ceiling;
* **asyncpg**: a hand-written grpc.aio + asyncpg-pool server reading the row with one
  SELECT (same file): the cost of the work without Ferrule's guarantees;
* **cached**: Ferrule with Redis and its near cache;
* **uncached**: Ferrule with ``FERRULE_CACHE_ENABLED=false``.

Load: h2load (bench/h2load.py), one connection, ``--reads-in-flight`` streams, tracing
off. Figures per server: req/s, CPU per call of the server, of its PostgreSQL backends
and of Redis, and p50/p99 from a Python sampler making one call at a time (low load,
``--reads-sample-calls`` calls per round). Ratios: ``cached / bare`` and
``uncached / asyncpg``, from req/s and from server CPU per call (the steadier figure on
a shared machine), medians over rounds.

Answers are checked outside h2load (which never reads grpc-status): a gRPC call to every
server before and after must return the expected user, every h2load request must end
2xx, and Ferrule's request log must hold no GetUser with a status other than OK.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass

import grpc

from bench.h2load import H2Result, body_file, redis_pid, request_log_statuses, run_h2load
from bench.harness import ServerProcess, server_process
from bench.loadgen import median
from bench.registry import Figures
from ferrule.v1 import user_service_pb2 as user_pb

GET_USER = "/ferrule.v1.UserService/GetUser"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--reads-views", default=env("BENCH_READS_VIEWS", "h2load,python"),
        help="h2load (the four servers under h2load) and/or python (the Python client)",
    )  # fmt: skip
    parser.add_argument("--reads-in-flight", type=int, default=64)
    parser.add_argument(
        "--reads-h2load-seconds", type=float, default=float(env("BENCH_READS_H2LOAD_SECONDS", "3"))
    )
    parser.add_argument("--reads-sample-calls", type=int, default=200)


@dataclass
class Samples:
    runs: list[H2Result]
    latencies: list[float]


async def check_answer(target: str, token: str, request: user_pb.GetUserRequest) -> user_pb.User:
    """One real gRPC call: raises unless the server answers OK with the user asked for."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = channel.unary_unary(
            GET_USER,
            request_serializer=user_pb.GetUserRequest.SerializeToString,
            response_deserializer=user_pb.User.FromString,
        )
        user: user_pb.User = await stub(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )
    if user.name != request.name:
        raise RuntimeError(f"{target} answered {user.name!r} for {request.name!r}")
    return user


async def sample_latencies(
    target: str, token: str, request: user_pb.GetUserRequest, calls: int
) -> list[float]:
    """``calls`` sequential calls (one in flight): latency without queueing."""
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = channel.unary_unary(
            GET_USER,
            request_serializer=user_pb.GetUserRequest.SerializeToString,
            response_deserializer=user_pb.User.FromString,
        )
        for _ in range(20):
            await stub(request, metadata=metadata, timeout=30)
        for _ in range(calls):
            started = time.perf_counter()
            await stub(request, metadata=metadata, timeout=30)
            latencies.append(time.perf_counter() - started)
    return latencies


def percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run_view(
    args: argparse.Namespace,
    *,
    database_url: str,
    cached: ServerProcess,
    uncached: ServerProcess,
    user_name: str,
    token: str,
    redis_url: str,
    references: dict[str, ServerProcess] | None = None,
) -> Figures:
    """``references``: another revision's Ferrule servers (``cached_reference``,
    ``uncached_reference``), loaded in the same rounds for an interleaved A/B."""
    request = user_pb.GetUserRequest(name=user_name)
    reference_env = {"BENCH_USER_NAME": user_name}
    redis = await redis_pid(redis_url)
    async with (
        server_process(
            database_url, module="bench._reference_server", BENCH_REFERENCE="bare",
            **reference_env,
        ) as bare,
        server_process(
            database_url, module="bench._reference_server", BENCH_REFERENCE="asyncpg",
            **reference_env,
        ) as handwritten,
    ):  # fmt: skip
        servers = {
            "bare": bare, "asyncpg": handwritten, "cached": cached, "uncached": uncached,
            **(references or {}),
        }  # fmt: skip
        names = tuple(servers)
        expected = await check_answer(cached.target, token, request)
        for name, server in servers.items():
            answer = await check_answer(server.target, token, request)
            if answer != expected:
                raise RuntimeError(f"{name} answers a different User than Ferrule")
        logged_before = await request_log_statuses(database_url, GET_USER)
        samples = {name: Samples([], []) for name in names}
        with body_file(request.SerializeToString()) as body:

            async def load(server: ServerProcess, seconds: float) -> H2Result:
                return await run_h2load(
                    target=server.target, path=GET_USER, body=body, token=token,
                    seconds=seconds, in_flight=args.reads_in_flight, server_pid=server.pid,
                    redis_pid=redis,
                )  # fmt: skip

            for server in servers.values():  # warm: connections, caches, statements
                await load(server, 1)
            for round_number in range(args.reads_rounds):
                order = names if round_number % 2 == 0 else tuple(reversed(names))
                for name in order:
                    result = await load(servers[name], args.reads_h2load_seconds)
                    samples[name].runs.append(result)
                    samples[name].latencies += await sample_latencies(
                        servers[name].target, token, request, args.reads_sample_calls
                    )
                    us = result.us_per_call
                    print(
                        f"[h2load round {round_number + 1}] {name:<18} {result.rps:>7,.0f} req/s"
                        f"  server {us(result.server_cpu_s):5,.0f} us/call"
                        f"  pg {us(result.postgres_cpu_s):4,.0f}"
                        f"  redis {us(result.redis_cpu_s):4,.0f}"
                        f"  2xx {result.status_2xx}/{result.requests}"
                        f"  load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                    if not result.clean:  # say why: h2load's own counts and errors
                        print(result.report.strip(), flush=True)
        for server in servers.values():
            await check_answer(server.target, token, request)
        logged_after = await _settled_request_log(database_url)
    return summarize(samples, logged_before, logged_after)


async def _settled_request_log(database_url: str) -> dict[str, int]:
    """The request log's counts once its background batches have stopped arriving
    (bounded: at most 10 s)."""
    last = await request_log_statuses(database_url, GET_USER)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await request_log_statuses(database_url, GET_USER)
        if now == last:
            break
        last = now
    return last


def summarize(
    samples: dict[str, Samples], logged_before: dict[str, int], logged_after: dict[str, int]
) -> Figures:
    figures: Figures = {}
    per_call: dict[str, list[float]] = {}
    for name in samples:
        runs = samples[name].runs
        per_call[name] = [r.us_per_call(r.server_cpu_s) for r in runs]
        figures[f"h2load_{name}_rps"] = round(median([r.rps for r in runs]))
        figures[f"h2load_{name}_server_us_per_call"] = round(median(per_call[name]))
        figures[f"h2load_{name}_postgres_us_per_call"] = round(
            median([r.us_per_call(r.postgres_cpu_s) for r in runs])
        )
        figures[f"h2load_{name}_redis_us_per_call"] = round(
            median([r.us_per_call(r.redis_cpu_s) for r in runs])
        )
        figures[f"h2load_{name}_p50_ms"] = round(percentile_ms(samples[name].latencies, 0.5), 3)
        figures[f"h2load_{name}_p99_ms"] = round(percentile_ms(samples[name].latencies, 0.99), 3)
    rounds = len(samples["bare"].runs)

    def ratio(a: str, b: str) -> tuple[float, float]:
        by_rate = [samples[a].runs[k].rps / samples[b].runs[k].rps for k in range(rounds)]
        by_cpu = [per_call[b][k] / per_call[a][k] for k in range(rounds)]
        return round(statistics.median(by_rate), 3), round(statistics.median(by_cpu), 3)

    figures["h2load_cached_vs_bare"], figures["h2load_cached_vs_bare_cpu"] = ratio("cached", "bare")
    figures["h2load_uncached_vs_asyncpg"], figures["h2load_uncached_vs_asyncpg_cpu"] = ratio(
        "uncached", "asyncpg"
    )
    for mode in ("cached", "uncached"):
        if f"{mode}_reference" in samples:
            rate, cpu = ratio(mode, f"{mode}_reference")
            figures[f"h2load_{mode}_vs_reference"] = rate
            figures[f"h2load_{mode}_vs_reference_cpu"] = cpu
            print(f"{mode} vs the reference tree: rate {rate:.3f}, by CPU per call {cpu:.3f}")
    unclean = sum(not r.clean for s in samples.values() for r in s.runs)
    logged = {
        status: count - logged_before.get(status, 0) for status, count in logged_after.items()
    }
    # h2load's -D ends a run by resetting the streams still in flight: those calls are
    # logged CANCELLED (at most in-flight per run); any other status is an error.
    logged_errors = sum(n for status, n in logged.items() if status not in ("OK", "CANCELLED"))
    figures["h2load_unclean_runs"] = unclean
    figures["h2load_request_log_errors"] = logged_errors
    figures["h2load_request_log_cancelled"] = logged.get("CANCELLED", 0)
    figures["h2load_request_log_calls"] = sum(logged.values())
    figures["h2load_loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(f"{'server':<18} {'req/s':>8} {'server us':>10} {'pg us':>6} {'redis us':>8}"
          f" {'p50 ms':>7} {'p99 ms':>7}", flush=True)  # fmt: skip
    for name in samples:
        f = {k.removeprefix(f"h2load_{name}_"): v for k, v in figures.items()
             if k.startswith(f"h2load_{name}_")}  # fmt: skip
        print(
            f"{name:<18} {f['rps']:>8,} {f['server_us_per_call']:>10,}"
            f" {f['postgres_us_per_call']:>6,} {f['redis_us_per_call']:>8,}"
            f" {f['p50_ms']:>7.2f} {f['p99_ms']:>7.2f}",
            flush=True,
        )
    print(
        f"cached/bare {figures['h2load_cached_vs_bare']:.3f} (by CPU per call"
        f" {figures['h2load_cached_vs_bare_cpu']:.3f}); uncached/asyncpg"
        f" {figures['h2load_uncached_vs_asyncpg']:.3f} (by CPU per call"
        f" {figures['h2load_uncached_vs_asyncpg_cpu']:.3f}); runs not all-2xx {unclean};"
        f" request log: {figures['h2load_request_log_calls']} GetUser, {logged_errors} errors,"
        f" {figures['h2load_request_log_cancelled']} cancelled at h2load's stop;"
        f" load average {figures['h2load_loadavg_1m']}",
        flush=True,
    )
    return figures
