"""Search scenario: SearchAnalyses latency over 100,000 analyses of one organization on
PostgreSQL, beside ListAnalyses (the same page size, no text search) on the same server.

The texts are 24 words drawn from a Zipf-skewed vocabulary, loaded with COPY (the
generated ``tsvector`` column is computed as they arrive), then ``VACUUM ANALYZE`` as
autovacuum would. Four kinds of query, in turn: a rare word, a common word (most of the
organization matches and is ranked), a two-word phrase, and ``a OR b``. Every figure is
measured three times: without ``DATABASE_APP_ROLE`` (``no_rls``); with it, the database
as migration 0004 leaves it (``rls``: ``ts_match_vq`` LEAKPROOF, so the GIN index serves
under the policy); and with it after ``ALTER FUNCTION ... NOT LEAKPROOF`` through a
server started afterwards (``rls_unmarked``: what a database migrated by a role that is
not a superuser gets; the planner reads the organization's rows instead). See
docs/search.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import uuid
from collections.abc import AsyncIterator

import asyncpg

from bench.harness import ServerProcess, driverless, fresh_database, org_token, server_process
from bench.loadgen import Call, LoadResult, run_load
from bench.registry import Figures, Scenario
from db.models.base import new_id
from db.repositories.analyses import content_hash
from db.search_sql import PG_MATCH_FUNCTION
from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import analysis_service_pb2 as pb

VOCABULARY = 5000
WORDS_PER_TEXT = 24
APP_ROLE = "ferrule_app"


def _word(rank: int) -> str:
    """A pronounceable, unstemmable made-up word per rank ("bakodu", "bakofa", ...)."""
    syllables = ["ba", "ko", "du", "fa", "ri", "ne", "lo", "mu", "zi", "te"]
    out = []
    n = rank
    for _ in range(4):
        out.append(syllables[n % 10])
        n //= 10
    return "x" + "".join(out)


def texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (r + 1) for r in range(VOCABULARY)]
    words = [_word(r) for r in range(VOCABULARY)]
    return [
        f"doc{i} " + " ".join(rng.choices(words, weights, k=WORDS_PER_TEXT)) for i in range(count)
    ]


def queries() -> dict[str, str]:
    return {
        "rare": _word(3000),
        "common": _word(1),
        "phrase": f'"{_word(0)} {_word(2)}"',
        "or": f"{_word(500)} OR {_word(700)}",
    }


async def load(database_url: str, organization: uuid.UUID, count: int) -> None:
    conn = await asyncpg.connect(driverless(database_url))
    try:
        records = [
            (new_id(), organization, body, content_hash(body), "SENTIMENT", "STANDARD", "PENDING")
            for body in texts(count)
        ]
        columns = [
            "id",
            "organization_id",
            "text",
            "content_hash",
            "analysis_type",
            "optimization_tier",
            "state",
        ]
        await conn.copy_records_to_table("text_analyses", records=records, columns=columns)
        await conn.execute("VACUUM ANALYZE text_analyses")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def reader(server: ServerProcess, token: str) -> AsyncIterator[AsyncFerruleClient]:
    client = AsyncFerruleClient(
        config=ClientConfig(target=server.target, token=token, default_timeout=60.0)
    )
    try:
        yield client
    finally:
        await client.close()


def search_call(client: AsyncFerruleClient, parent: str, query: str, size: int) -> Call:
    request = pb.SearchAnalysesRequest(parent=parent, query=query, page_size=size)

    async def call(_: int) -> object:
        return await client.analyses.SearchAnalyses(request)

    return call


def list_call(client: AsyncFerruleClient, parent: str, size: int) -> Call:
    request = pb.ListAnalysesRequest(parent=parent, page_size=size)

    async def call(_: int) -> object:
        return await client.analyses.ListAnalyses(request)

    return call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--search-analyses", type=int, default=int(env("BENCH_SEARCH_ANALYSES", "100000"))
    )
    parser.add_argument(
        "--search-seconds", type=float, default=float(env("BENCH_SEARCH_SECONDS", "2"))
    )
    parser.add_argument("--search-rounds", type=int, default=int(env("BENCH_SEARCH_ROUNDS", "3")))
    parser.add_argument("--search-concurrency", type=int, default=4)
    parser.add_argument("--search-page-size", type=int, default=20)


MODES = ("no_rls", "rls", "rls_unmarked")


async def insert_organization(database_url: str, organization: uuid.UUID) -> None:
    conn = await asyncpg.connect(driverless(database_url))
    try:
        await conn.execute(
            "INSERT INTO organizations (id, display_name) VALUES ($1, 'search')", organization
        )
    finally:
        await conn.close()


async def set_match_leakproof(database_url: str, leakproof: bool) -> None:
    conn = await asyncpg.connect(driverless(database_url))
    try:
        mark = "LEAKPROOF" if leakproof else "NOT LEAKPROOF"
        await conn.execute(f"ALTER FUNCTION {PG_MATCH_FUNCTION} {mark}")
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> Figures:
    count, rounds = args.search_analyses, args.search_rounds
    concurrency, size = args.search_concurrency, args.search_page_size
    figures: Figures = {
        "analyses": count,
        "concurrency": concurrency,
        "page_size": size,
        "rounds": rounds,
    }
    async with (
        fresh_database() as marked_url,
        fresh_database() as unmarked_url,
        server_process(marked_url) as owner,
        server_process(marked_url, DATABASE_APP_ROLE=APP_ROLE) as rls,
    ):
        # The same rows in a second database whose match function is not LEAKPROOF (as
        # a migration by a role that is not a superuser leaves it), served from the
        # start so that no cached plan predates the change.
        organization = await owner.create_organization("search")
        await load(marked_url, organization, count)
        await set_match_leakproof(unmarked_url, False)
        async with server_process(unmarked_url, DATABASE_APP_ROLE=APP_ROLE) as unmarked:
            await insert_organization(unmarked_url, organization)
            await load(unmarked_url, organization, count)
            servers = dict(zip(MODES, (owner, rls, unmarked), strict=True))
            results = await _interleaved(servers, organization, args)
    for key, samples in results.items():
        figures[f"{key}_p50_ms"] = round(statistics.median(r.p50_ms for r in samples), 2)
        figures[f"{key}_p99_ms"] = round(statistics.median(r.p99_ms for r in samples), 2)
        figures[f"{key}_rps"] = round(statistics.median(r.rps for r in samples), 1)
        figures[f"{key}_errors"] = sum(r.errors for r in samples)
    for name in ("list", *queries()):
        # Ratios per round (same machine, seconds apart), then their median.
        for mode in ("rls", "rls_unmarked"):
            ratio = statistics.median(
                over.p50_ms / base.p50_ms
                for over, base in zip(
                    results[f"{mode}_{name}"], results[f"no_rls_{name}"], strict=True
                )
            )
            figures[f"{mode}_over_no_rls_{name}_p50"] = round(ratio, 2)
    for key, value in figures.items():
        if "_over_" in key or key.endswith("_p50_ms"):
            print(f"{key:>40}: {value}", flush=True)
    return figures


async def _interleaved(
    servers: dict[str, ServerProcess], organization: uuid.UUID, args: argparse.Namespace
) -> dict[str, list[LoadResult]]:
    """Every (mode, query) measured once per round, the modes of a query back to back."""
    parent = f"organizations/{organization}"
    token = org_token(organization, scope="read")
    size = args.search_page_size
    results: dict[str, list[LoadResult]] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            mode: await stack.enter_async_context(reader(server, token))
            for mode, server in servers.items()
        }
        calls: dict[str, dict[str, Call]] = {
            mode: {"list": list_call(client, parent, size)}
            | {name: search_call(client, parent, q, size) for name, q in queries().items()}
            for mode, client in clients.items()
        }
        for mode_calls in calls.values():
            for call in mode_calls.values():
                await call(0)  # warm: connections, plans, the pages read
        for round_number in range(args.search_rounds):
            for name in ("list", *queries()):
                for mode, server in servers.items():
                    result = await run_load(
                        calls[mode][name],
                        seconds=args.search_seconds,
                        concurrency=args.search_concurrency,
                        server_pid=server.pid,
                    )
                    results.setdefault(f"{mode}_{name}", []).append(result)
                    print(
                        f"round {round_number} {mode + '_' + name:>20}: p50 {result.p50_ms:8.2f}"
                        f" ms  p99 {result.p99_ms:8.2f} ms  errors {result.errors}",
                        flush=True,
                    )
    return results


SCENARIO = Scenario(
    name="search",
    run=run,
    add_arguments=add_arguments,
    description=(
        "SearchAnalyses p50/p99 over 100,000 analyses (PostgreSQL): without RLS, under RLS, "
        "and under RLS without the LEAKPROOF mark"
    ),
)
