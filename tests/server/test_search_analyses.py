"""AnalysisService.SearchAnalyses end to end on PostgreSQL, MariaDB and SQLite: the real
server on a real port, called through the client package and its pagers."""

from __future__ import annotations

import asyncio

import pytest

from db.engine import Database
from db.repositories.organizations import OrganizationsRepository
from db.tenancy import Tenant
from ferrule.client import (
    AsyncFerruleClient,
    FerruleClient,
    InvalidArgument,
    aiterate_items,
    aiterate_pages,
    iterate_items,
)
from ferrule.v1 import analysis_service_pb2 as pb
from tests.server.conftest import RunningServer, make_token

SENTIMENT = pb.ANALYSIS_TYPE_SENTIMENT
QUALITY = pb.ANALYSIS_TYPE_QUALITY
FILLER = [
    "quarterly revenue grew steadily across northern regions",
    "customers praised the friendly support team",
    "shipping delays frustrated several buyers",
    "battery life remains disappointing overall",
]

#: Quotes, operators of every backend's own syntax, every ASCII punctuation mark alone and
#: together, control characters, long and very long input.
HOSTILE = [
    '"',
    '""""',
    '"unclosed',
    "-",
    "OR",
    "a OR",
    "OR b",
    "-OR",
    "NOT AND OR NEAR(x y, 2)",
    "text:volcano",
    "volcano*",
    "+volcano -",
    "'; DROP TABLE text_analyses; --",
    "!!volcano & (lava | ash) <-> :* \\",
    "@@ MATCH AGAINST (x IN BOOLEAN MODE)",
    "\t\n\r\x01\x1f\x7f",
    "\ud7ff\ufeff\u202e",
    *[chr(c) for c in range(33, 127) if not chr(c).isalnum()],
    "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum()),
    "volcano " + "".join(chr(c) + "lava" for c in range(33, 127) if not chr(c).isalnum()),
    "volcano " * 1250,
    "v" * 10_000,
    '"' * 10_000,
    "-" * 10_000,
    "x " * 5_000,
]


async def _org(server: RunningServer) -> tuple[str, AsyncFerruleClient]:
    database = Database.from_url(server.database_url)
    try:
        async with database.transaction(Tenant.all()) as session:
            org = await OrganizationsRepository(session, Tenant.all()).create("search")
    finally:
        await database.dispose()
    return f"organizations/{org.id}", server.for_org(org.id)


async def _create(
    client: AsyncFerruleClient,
    parent: str,
    *texts: str,
    kind: pb.AnalysisType.ValueType = SENTIMENT,
) -> list[pb.Analysis]:
    created: list[pb.Analysis] = []
    for start in range(0, len(texts), 500):
        response = await client.analyses.BatchCreateAnalyses(
            pb.BatchCreateAnalysesRequest(
                parent=parent,
                requests=[
                    pb.CreateAnalysisRequest(analysis=pb.Analysis(text=t, analysis_type=kind))
                    for t in texts[start : start + 500]
                ],
            )
        )
        created += response.analyses
    return created


async def _search(
    client: AsyncFerruleClient, parent: str, query: str, **fields: object
) -> list[pb.SearchResult]:
    request = pb.SearchAnalysesRequest(parent=parent, query=query, **fields)  # type: ignore[arg-type]
    return [r async for r in aiterate_items(client.analyses.SearchAnalyses, request, "results")]


async def test_results_come_by_relevance_with_score_and_snippet(any_server: RunningServer) -> None:
    parent, client = await _org(any_server)
    await _create(
        client,
        parent,
        *FILLER,
        "volcano eruption: lava flows and volcano ash, volcano closed",
        "the volcano observatory reopened",
        "lava lamp collectors meet",
        "eruption of applause",
    )
    results = await _search(client, parent, "volcano")
    assert [r.analysis.text for r in results] == [
        "volcano eruption: lava flows and volcano ash, volcano closed",
        "the volcano observatory reopened",
    ]
    assert results[0].score > results[1].score
    assert all("<b>volcano</b>" in r.snippet.lower() for r in results)
    assert all(r.analysis.name.startswith(parent + "/analyses/") for r in results)

    either = await _search(client, parent, "lava OR observatory")
    assert {r.analysis.text for r in either} == {
        "volcano eruption: lava flows and volcano ash, volcano closed",
        "the volcano observatory reopened",
        "lava lamp collectors meet",
    }
    phrase = await _search(client, parent, '"lava flows"')
    assert [r.analysis.text for r in phrase] == [
        "volcano eruption: lava flows and volcano ash, volcano closed"
    ]
    assert await _search(client, parent, '"flows lava"') == []
    excluded = await _search(client, parent, "volcano -observatory")
    assert [r.analysis.text for r in excluded] == [
        "volcano eruption: lava flows and volcano ash, volcano closed"
    ]


async def test_filters_and_show_deleted(any_server: RunningServer) -> None:
    parent, client = await _org(any_server)
    *_, kept, deleted = await _create(client, parent, *FILLER, "meadow bloom", "meadow mowed")
    (other_kind,) = await _create(client, parent, "meadow survey", kind=QUALITY)
    await client.analyses.DeleteAnalysis(pb.DeleteAnalysisRequest(name=deleted.name))
    live = await _search(client, parent, "meadow")
    assert {r.analysis.name for r in live} == {kept.name, other_kind.name}
    everything = await _search(client, parent, "meadow", show_deleted=True)
    assert {r.analysis.name for r in everything} == {kept.name, deleted.name, other_kind.name}
    typed = await _search(client, parent, "meadow", analysis_type=QUALITY)
    assert [r.analysis.name for r in typed] == [other_kind.name]


async def test_hostile_queries_answer_ok(any_server: RunningServer) -> None:
    parent, client = await _org(any_server)
    await _create(client, parent, *FILLER, "volcano lava ash", "lava fields")
    for query in HOSTILE:
        response = await client.analyses.SearchAnalyses(
            pb.SearchAnalysesRequest(parent=parent, query=query)
        )
        assert all(r.analysis.name.startswith(parent) for r in response.results), query
    # Operators of the backends' own syntax are plain words (or separators) here.
    found = await _search(client, parent, "volcano* +lava (ash)")
    assert [r.analysis.text for r in found] == ["volcano lava ash"]


async def test_nul_and_empty_queries_are_invalid_argument(any_server: RunningServer) -> None:
    parent, client = await _org(any_server)
    for query, description in [("volcano\x00", "NUL"), ("", "required")]:
        with pytest.raises(InvalidArgument) as refused:
            await client.analyses.SearchAnalyses(
                pb.SearchAnalysesRequest(parent=parent, query=query)
            )
        ((field, message),) = refused.value.field_violations
        assert field == "query"
        assert description in message


async def test_pager_walks_500_results_without_repeat_or_gap(any_server: RunningServer) -> None:
    parent, client = await _org(any_server)
    # Seven groups of equal scores: ties are ordered by id, across page boundaries too.
    texts = [f"entry {i} " + "nebula " * (1 + i % 7) + f"w{i}" for i in range(500)]
    created = await _create(client, parent, *texts, *[f"entry {i} unrelated" for i in range(50)])
    request = pb.SearchAnalysesRequest(parent=parent, query="nebula", page_size=33)
    pages = [p async for p in aiterate_pages(client.analyses.SearchAnalyses, request)]
    names = [r.analysis.name for p in pages for r in p.results]
    assert len(pages) == 16
    assert len(names) == len(set(names)) == 500
    assert set(names) == {a.name for a in created[:500]}
    scores = [r.score for p in pages for r in p.results]
    assert scores == sorted(scores, reverse=True)


async def test_another_tenant_sees_none_of_its_texts(any_server: RunningServer) -> None:
    parent_a, client_a = await _org(any_server)
    parent_b, client_b = await _org(any_server)
    await _create(client_a, parent_a, *FILLER, *[f"secret zeppelin plan {i}" for i in range(5)])
    await _create(client_b, parent_b, *FILLER, "zeppelin museum")
    seen_by_b = await _search(client_b, parent_b, "zeppelin OR secret OR plan")
    assert [r.analysis.text for r in seen_by_b] == ["zeppelin museum"]
    page = await client_a.analyses.SearchAnalyses(
        pb.SearchAnalysesRequest(parent=parent_a, query="zeppelin", page_size=2)
    )
    assert page.next_page_token
    # A's token is A's: B cannot continue A's search with it, nor A change the query.
    with pytest.raises(InvalidArgument):
        await client_b.analyses.SearchAnalyses(
            pb.SearchAnalysesRequest(
                parent=parent_b, query="zeppelin", page_token=page.next_page_token
            )
        )
    with pytest.raises(InvalidArgument):
        await client_a.analyses.SearchAnalyses(
            pb.SearchAnalysesRequest(parent=parent_a, query="plan", page_token=page.next_page_token)
        )


async def test_the_sync_client_pager_walks_a_search(any_server: RunningServer) -> None:
    parent, client = await _org(any_server)
    created = await _create(client, parent, *FILLER, *[f"comet tail {i}" for i in range(7)])
    request = pb.SearchAnalysesRequest(parent=parent, query="comet", page_size=3)
    token = make_token(parent.removeprefix("organizations/"), scope="read")

    def walk() -> list[str]:
        with FerruleClient(any_server.target, token=token) as sync:
            results = iterate_items(sync.analyses.SearchAnalyses, request, "results")
            return [r.analysis.name for r in results]

    names = await asyncio.to_thread(walk)
    assert sorted(names) == sorted(a.name for a in created[len(FILLER) :])
