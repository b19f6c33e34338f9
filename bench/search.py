"""Search scenario: SearchAnalyses latency over 100,000 analyses of one organization on
PostgreSQL, beside ListAnalyses (the same page size, no text search) on the same server.

The texts are 24 words drawn from a Zipf-skewed vocabulary, loaded with COPY (the
generated ``tsvector`` column is computed as they arrive), then ``VACUUM ANALYZE`` as
autovacuum would. Four kinds of query, in turn: a rare word, a common word (most of the
organization matches and is ranked), a two-word phrase, and ``a OR b``. Every figure is
measured twice, with and without ``DATABASE_APP_ROLE``: under row-level security
PostgreSQL cannot use the GIN index for ``@@`` (not a leakproof operator) and reads the
organization's rows instead (docs/search.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator

import asyncpg

from bench.harness import ServerProcess, driverless, fresh_database, org_token, server_process
from bench.loadgen import Call, LoadResult, run_load
from bench.registry import Figures, Scenario
from db.models.base import new_id
from db.repositories.analyses import content_hash
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
        "--search-seconds", type=float, default=float(env("BENCH_SEARCH_SECONDS", "4"))
    )
    parser.add_argument("--search-concurrency", type=int, default=4)
    parser.add_argument("--search-page-size", type=int, default=20)


def _figures(prefix: str, result: LoadResult) -> Figures:
    return {
        f"{prefix}_p50_ms": round(result.p50_ms, 2),
        f"{prefix}_p99_ms": round(result.p99_ms, 2),
        f"{prefix}_rps": round(result.rps, 1),
        f"{prefix}_errors": result.errors,
    }


async def run(args: argparse.Namespace) -> Figures:
    count, seconds = args.search_analyses, args.search_seconds
    concurrency, size = args.search_concurrency, args.search_page_size
    figures: Figures = {"analyses": count, "concurrency": concurrency, "page_size": size}
    async with (
        fresh_database() as database_url,
        server_process(database_url) as owner,
        server_process(database_url, DATABASE_APP_ROLE=APP_ROLE) as rls,
    ):
        organization = await owner.create_organization("search")
        await load(database_url, organization, count)
        parent = f"organizations/{organization}"
        token = org_token(organization, scope="read")
        for mode, server in (("no_rls", owner), ("rls", rls)):
            async with reader(server, token) as client:
                plan = [("list", list_call(client, parent, size))] + [
                    (name, search_call(client, parent, query, size))
                    for name, query in queries().items()
                ]
                for name, call in plan:
                    await call(0)  # warm: connections, plans, the pages read
                    result = await run_load(
                        call, seconds=seconds, concurrency=concurrency, server_pid=server.pid
                    )
                    key = f"{mode}_{name}"
                    figures.update(_figures(key, result))
                    print(
                        f"{key:>16}: p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms"
                        f"  {result.rps:8.1f}/s  errors {result.errors}",
                        flush=True,
                    )
    return figures


SCENARIO = Scenario(
    name="search",
    run=run,
    add_arguments=add_arguments,
    description="SearchAnalyses p50/p99 over 100,000 analyses (PostgreSQL), with and without RLS",
)
