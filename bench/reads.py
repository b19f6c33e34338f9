"""Read scenario: GetUser with the cache on and off, in two views.

**The h2load view** (first; bench/reads_h2load.py): h2load drives one user's GetUser
against a bare grpc.aio server, a hand-written grpc.aio + asyncpg server, and Ferrule
cached and uncached, interleaved; server, PostgreSQL and Redis CPU per call, and the
ratios cached/bare and uncached/asyncpg. ``--reads-views h2load`` runs only that one.

**The Python-client view** (second), described below:

Two server subprocesses on one fresh database holding ``--reads-users`` users:

* **cache on**: ``REDIS_URL`` set (the shared Redis, keys under a unique
  ``FERRULE_CACHE_PREFIX``, deleted afterwards);
* **cache off**: ``FERRULE_CACHE_ENABLED=false``: every read goes to PostgreSQL.

The load: one client process (this one, through ``AsyncFerruleClient`` with its
interceptors) keeps ``--reads-concurrency`` GetUser calls in flight on one channel,
names drawn from a Zipf distribution (s = ``--reads-zipf-s``) over the users.

**The ceiling** is ``grpc.health.v1.Health/Check`` on the same server, through the same
client: the same gRPC server, the same interceptor chain (call context, tracing, request
log, error mapping; authentication is skipped because the health service is public, and
JWT verification is part of what GetUser pays) and the same client interceptors, with a
handler that only reads an in-memory status. It measures what the framework plus
Ferrule's per-call plumbing allow on this machine, with this client.

Each measurement is repeated ``--reads-rounds`` times, interleaved (ceiling, cached,
ceiling, uncached) so that drift from other load on the machine hits all of them alike;
the figures are the medians. CPU per side (1.0 = one core) says who was the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import (
    ServerProcess,
    fresh_database,
    org_token,
    server_process,
    server_process_in,
)
from bench.loadgen import (
    Call,
    LoadResult,
    cache_counters,
    median_result,
    run_load,
    seed_users,
    zipf_indexes,
    zipf_top_share,
)
from bench.reads_h2load import add_arguments as add_h2load_arguments
from bench.reads_h2load import run_view as run_h2load_view
from bench.registry import Figures, Scenario
from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import user_service_pb2 as user_pb

REDIS_URL = os.environ.get(
    "BENCH_REDIS_URL", os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--reads-users", type=int, default=int(env("BENCH_READS_USERS", "10000")))
    parser.add_argument("--reads-zipf-s", type=float, default=1.1)
    parser.add_argument("--reads-concurrency", type=int, default=16)
    parser.add_argument(
        "--reads-seconds", type=float, default=float(env("BENCH_READS_SECONDS", "4")),
        help="seconds per measurement",
    )  # fmt: skip
    parser.add_argument("--reads-rounds", type=int, default=int(env("BENCH_READS_ROUNDS", "3")))
    parser.add_argument(
        "--reads-reference-tree", default=env("BENCH_READS_REFERENCE_TREE", ""),
        help="a checkout of another revision (e.g. a git worktree of main): its servers"
        " are measured too, interleaved with this one's (cached in the Python view, cached"
        " and uncached in the h2load view)",
    )  # fmt: skip
    parser.add_argument(
        "--reads-app-role", default=env("BENCH_READS_APP_ROLE", "ferrule_app"),
        help="DATABASE_APP_ROLE of the servers (row-level security on); '' for none",
    )  # fmt: skip
    add_h2load_arguments(parser)


@contextlib.asynccontextmanager
async def reader(server: ServerProcess, token: str) -> AsyncIterator[AsyncFerruleClient]:
    config = ClientConfig(target=server.target, token=token, default_timeout=30.0)
    async with AsyncFerruleClient(config=config) as client:
        yield client


def get_user_call(client: AsyncFerruleClient, requests: list[user_pb.GetUserRequest]) -> Call:
    size = len(requests)
    stub = client.users

    async def call(i: int) -> object:
        return await stub.GetUser(requests[i % size])

    return call


def health_check_call(client: AsyncFerruleClient) -> Call:
    stub = health_pb2_grpc.HealthStub(client.channel)
    request = health_pb2.HealthCheckRequest(service="")

    async def call(i: int) -> object:
        return await stub.Check(request)

    return call


def describe(label: str, result: LoadResult, ceiling: float | None = None) -> str:
    share = f" = {result.rps / ceiling:6.1%} of ceiling" if ceiling else ""
    return (
        f"{label:<28} {result.rps:>8,.0f} RPC/s{share}  p50 {result.p50_ms:.2f} ms"
        f"  p99 {result.p99_ms:.2f} ms  cpu server {result.server_cpu:.2f}"
        f" ({server_us_per_call(result):,.0f} us/call) client {result.client_cpu:.2f}"
        f"  errors {result.errors}"
    )


def server_us_per_call(result: LoadResult) -> float:
    """Server CPU per call: steadier than the rate on a shared machine, where the rate
    also moves with how much CPU the client and PostgreSQL got."""
    return result.server_cpu / result.rps * 1e6 if result.rps else 0.0


def result_figures(prefix: str, result: LoadResult) -> Figures:
    return {
        f"{prefix}_rps": round(result.rps),
        f"{prefix}_p50_ms": round(result.p50_ms, 3),
        f"{prefix}_p99_ms": round(result.p99_ms, 3),
        f"{prefix}_server_cpu": round(result.server_cpu, 2),
        f"{prefix}_client_cpu": round(result.client_cpu, 2),
        f"{prefix}_server_us_per_call": round(server_us_per_call(result)),
    }


async def delete_prefix(prefix: str) -> None:
    client: Any = aioredis.Redis.from_url(REDIS_URL)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


async def run(args: argparse.Namespace) -> Figures:
    users, s = args.reads_users, args.reads_zipf_s
    seconds, concurrency = args.reads_seconds, args.reads_concurrency
    prefix = f"ferrule-bench-{uuid.uuid4().hex[:10]}"
    role = {"DATABASE_APP_ROLE": args.reads_app_role} if args.reads_app_role else {}
    cached_env = {"REDIS_URL": REDIS_URL, "FERRULE_CACHE_PREFIX": prefix, **role}
    uncached_env = {"FERRULE_CACHE_ENABLED": "false", **role}
    figures: Figures = {
        "users": users,
        "zipf_s": s,
        "concurrency": concurrency,
        "zipf_top100_share": round(zipf_top_share(users, s, 100), 3),
    }
    reference_tree = Path(args.reads_reference_tree) if args.reads_reference_tree else None
    reference_env = {**cached_env, "FERRULE_CACHE_PREFIX": f"{prefix}-reference"}
    try:
        async with (
            fresh_database() as database_url,
            server_process(database_url, **cached_env) as cached,
            server_process(database_url, **uncached_env) as uncached,
            contextlib.AsyncExitStack() as stack,
        ):
            reference = None
            h2load_references: dict[str, ServerProcess] = {}
            if reference_tree is not None:
                reference = await stack.enter_async_context(
                    server_process_in(reference_tree, database_url, **reference_env)
                )
                h2load_references = {
                    "cached_reference": reference,
                    "uncached_reference": await stack.enter_async_context(
                        server_process_in(reference_tree, database_url, **uncached_env)
                    ),
                }
            organization = await cached.create_organization("reads")
            ids = await seed_users(database_url, organization, users)
            requests = [
                user_pb.GetUserRequest(name=f"organizations/{organization}/users/{ids[k]}")
                for k in zipf_indexes(users, s, 200_000)
            ]
            token = org_token(organization, scope="read")
            views = {view.strip() for view in args.reads_views.split(",")}
            if "h2load" in views:
                figures.update(
                    await run_h2load_view(
                        args,
                        database_url=database_url,
                        cached=cached,
                        uncached=uncached,
                        user_name=f"organizations/{organization}/users/{ids[0]}",
                        token=token,
                        redis_url=REDIS_URL,
                        references=h2load_references,
                    )
                )
            if "python" not in views:
                return figures
            rounds: dict[str, list[LoadResult]] = {
                "ceiling": [],
                "getuser_cached": [],
                "ceiling_uncached_server": [],
                "getuser_uncached": [],
            }
            async with reader(cached, token) as on, reader(uncached, token) as off:
                plan: list[tuple[str, Call, int]] = [
                    ("ceiling", health_check_call(on), cached.pid),
                    ("getuser_cached", get_user_call(on, requests), cached.pid),
                    ("ceiling_uncached_server", health_check_call(off), uncached.pid),
                    ("getuser_uncached", get_user_call(off, requests), uncached.pid),
                ]
                if reference is not None:
                    ref = await stack.enter_async_context(reader(reference, token))
                    rounds["getuser_cached_reference"] = []
                    plan.insert(2, ("getuser_cached_reference", get_user_call(ref, requests),
                                    reference.pid))  # fmt: skip
                # Warm both servers (connections, statement caches, the cache itself).
                for _, call, pid in plan:
                    await run_load(call, seconds=1.0, concurrency=concurrency, server_pid=pid)
                counters_before = await cache_counters(cached)
                off_before = await cache_counters(uncached)
                for round_number in range(args.reads_rounds):
                    for name, call, pid in plan:
                        result = await run_load(
                            call, seconds=seconds, concurrency=concurrency, server_pid=pid
                        )
                        rounds[name].append(result)
                        print(f"[round {round_number + 1}] {describe(name, result)}", flush=True)
                counters_after = await cache_counters(cached)
                off_after = await cache_counters(uncached)
    finally:
        with contextlib.suppress(Exception):
            await delete_prefix(prefix)  # the reference's keys too
    ceiling = median_result(rounds["ceiling"] + rounds["ceiling_uncached_server"])
    best = {name: median_result(results) for name, results in rounds.items()}
    hit_rate = counters_after.rate_since(counters_before)
    off_hit_rate = off_after.rate_since(off_before)
    print(describe("ceiling (Health/Check)", ceiling), flush=True)
    print(describe("GetUser, cache on", best["getuser_cached"], ceiling.rps), flush=True)
    print(describe("GetUser, cache off", best["getuser_uncached"], ceiling.rps), flush=True)
    if "getuser_cached_reference" in best:
        reference_result = best["getuser_cached_reference"]
        print(describe(f"GetUser, cache on, {reference_tree}", reference_result), flush=True)
        figures.update(result_figures("getuser_cached_reference", reference_result))
        figures["cached_vs_reference_rps"] = round(
            best["getuser_cached"].rps / reference_result.rps, 3
        )
        figures["cached_vs_reference_cpu_per_call"] = round(
            server_us_per_call(best["getuser_cached"]) / server_us_per_call(reference_result), 3
        )
    print(
        f"hit rate: cache on {hit_rate:.1%} ({counters_after.backend}),"
        f" cache off {off_hit_rate:.1%} ({off_after.backend})",
        flush=True,
    )
    figures.update(result_figures("ceiling", ceiling))
    figures.update(result_figures("getuser_cached", best["getuser_cached"]))
    figures.update(result_figures("getuser_uncached", best["getuser_uncached"]))
    figures.update(
        {
            "cached_share_of_ceiling": round(best["getuser_cached"].rps / ceiling.rps, 3),
            "uncached_share_of_ceiling": round(best["getuser_uncached"].rps / ceiling.rps, 3),
            # The same shares by server CPU per call (ceiling's cost / GetUser's cost).
            "cached_cpu_share_of_ceiling": round(
                server_us_per_call(ceiling) / server_us_per_call(best["getuser_cached"]), 3
            ),
            "uncached_cpu_share_of_ceiling": round(
                server_us_per_call(ceiling) / server_us_per_call(best["getuser_uncached"]), 3
            ),
            "hit_rate": round(hit_rate, 4),
            "uncached_hit_rate": round(off_hit_rate, 4),
            "cache_backend": counters_after.backend,
            "rounds": args.reads_rounds,
            "errors": sum(r.errors for results in rounds.values() for r in results),
        }
    )
    return figures


SCENARIO = Scenario(
    name="reads",
    run=run,
    add_arguments=add_arguments,
    description="Zipf GetUser with the cache on (Redis) and off vs a trivial handler's ceiling",
)
