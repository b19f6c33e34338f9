"""Full-text search over analyses on every backend (PostgreSQL under RLS, SQLite, MariaDB).

The corpus is built by hand so each expectation is decidable on every backend: the words
are longer than InnoDB's minimum token size and none is a stopword anywhere, and filler
texts keep every searched word rare (InnoDB weighs a word found in every row at zero).
"""

from __future__ import annotations

import uuid
from typing import Any

from alembic import command
from sqlalchemy import Connection, delete, event, insert, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from db.engine import Database, DatabaseConfig
from db.migrate import alembic_config, upgrade_to_head
from db.models.analyses import TextAnalysis
from db.models.enums import AnalysisState, AnalysisType
from db.pagination import JSONValue
from db.repositories.analyses import (
    AnalysesRepository,
    AnalysisFilter,
    NewAnalysis,
    SearchHit,
    content_hash,
)
from db.repositories.organizations import OrganizationsRepository
from db.search_query import parse
from db.search_sql import PG_MATCH_FUNCTION, PG_VECTOR_COLUMN, PG_VECTOR_INDEX
from db.tenancy import Tenant
from tests.db.conftest import APP_ROLE

S = AnalysisType.SENTIMENT
FILLER = [
    "quarterly revenue grew steadily across northern regions",
    "customers praised the friendly support team",
    "shipping delays frustrated several buyers",
    "battery life remains disappointing overall",
    "packaging arrived damaged during winter",
    "software update improved camera quality",
]


async def add(database: Database, tenant: Tenant, *texts: str) -> dict[str, uuid.UUID]:
    ids: dict[str, uuid.UUID] = {}
    async with database.transaction(tenant) as session:
        repo = AnalysesRepository(session, tenant)
        for body in texts:
            created = await repo.create(NewAnalysis(body, S))
            ids[body] = created.analysis.id
    return ids


async def search(
    database: Database,
    tenant: Tenant,
    query: str,
    filter: AnalysisFilter | None = None,
    *,
    page_size: int = 0,
    cursor: list[JSONValue] | None = None,
) -> tuple[list[SearchHit], list[JSONValue] | None]:
    async with database.transaction(tenant, read_only=True) as session:
        page = await AnalysesRepository(session, tenant).search(
            parse(query), filter, page_size=page_size, cursor=cursor
        )
    return page.items, page.next_cursor


async def texts_found(database: Database, tenant: Tenant, query: str) -> list[str]:
    hits, _ = await search(database, tenant, query)
    return [h.analysis.text for h in hits]


async def test_more_occurrences_rank_higher_and_scores_descend(
    database: Database, tenant_a: Tenant
) -> None:
    await add(
        database,
        tenant_a,
        *FILLER,
        "turbine inspection found turbine blades cracked, turbine halted",
        "routine turbine inspection completed",
        "pipeline inspection completed without findings",
    )
    hits, _ = await search(database, tenant_a, "turbine")
    assert [h.analysis.text for h in hits] == [
        "turbine inspection found turbine blades cracked, turbine halted",
        "routine turbine inspection completed",
    ]
    assert hits[0].score > hits[1].score


async def test_a_text_with_both_alternatives_ranks_above_one_with_one(
    database: Database, tenant_a: Tenant
) -> None:
    await add(
        database,
        tenant_a,
        *FILLER,
        "the harbour crane lifted containers",
        "harbour crane and warehouse forklift both serviced",
        "warehouse inventory counted",
    )
    found = await texts_found(database, tenant_a, "forklift OR crane")
    assert found[0] == "harbour crane and warehouse forklift both serviced"
    assert set(found) == {
        "the harbour crane lifted containers",
        "harbour crane and warehouse forklift both serviced",
    }


async def test_every_term_is_required_unless_joined_by_or(
    database: Database, tenant_a: Tenant
) -> None:
    await add(
        database,
        tenant_a,
        *FILLER,
        "volcano eruption disrupted flights",
        "volcano monitoring station upgraded",
    )
    assert await texts_found(database, tenant_a, "volcano eruption") == [
        "volcano eruption disrupted flights"
    ]


async def test_a_phrase_matches_only_in_order(database: Database, tenant_a: Tenant) -> None:
    await add(
        database,
        tenant_a,
        *FILLER,
        "the glacier melted rapidly this summer",
        "rapidly glacier retreat measured",
    )
    assert await texts_found(database, tenant_a, '"glacier melted"') == [
        "the glacier melted rapidly this summer"
    ]
    assert await texts_found(database, tenant_a, '"melted glacier"') == []
    # A bare hyphenated word is the phrase of its parts.
    assert await texts_found(database, tenant_a, "glacier-melted") == [
        "the glacier melted rapidly this summer"
    ]


async def test_exclusion_excludes(database: Database, tenant_a: Tenant) -> None:
    await add(
        database,
        tenant_a,
        *FILLER,
        "orchard apples harvested early",
        "orchard pears harvested late",
        "orchard cherries spoiled",
    )
    found = await texts_found(database, tenant_a, 'orchard -pears -"cherries spoiled"')
    assert found == ["orchard apples harvested early"]
    # Only exclusions: nothing is included, so nothing matches.
    assert await texts_found(database, tenant_a, "-pears") == []


async def test_snippets_mark_the_matches_and_escape_the_text(
    database: Database, tenant_a: Tenant
) -> None:
    await add(database, tenant_a, *FILLER, "<script>alert(1)</script> meteorite crater surveyed")
    (hit,), _ = await search(database, tenant_a, "meteorite")
    assert "<b>meteorite</b>" in hit.snippet
    # Nothing of the text can open a tag: only the markers are markup.
    assert "<" not in hit.snippet.replace("<b>", "").replace("</b>", "")


async def test_deleted_analyses_only_with_show_deleted(
    database: Database, tenant_a: Tenant
) -> None:
    ids = await add(
        database, tenant_a, *FILLER, "lighthouse keeper retired", "lighthouse repainted"
    )
    async with database.transaction(tenant_a) as session:
        await AnalysesRepository(session, tenant_a).soft_delete(ids["lighthouse repainted"])
    assert await texts_found(database, tenant_a, "lighthouse") == ["lighthouse keeper retired"]
    shown, _ = await search(database, tenant_a, "lighthouse", AnalysisFilter(show_deleted=True))
    assert {h.analysis.text for h in shown} == {"lighthouse keeper retired", "lighthouse repainted"}


async def test_typed_filters_apply(database: Database, tenant_a: Tenant) -> None:
    ids = await add(database, tenant_a, *FILLER, "canyon hike planned", "canyon flood warning")
    async with database.transaction(tenant_a) as session:
        await AnalysesRepository(session, tenant_a).update(
            ids["canyon flood warning"], {"state": AnalysisState.PROCESSING}
        )
    processing, _ = await search(
        database, tenant_a, "canyon", AnalysisFilter(state=AnalysisState.PROCESSING)
    )
    assert [h.analysis.text for h in processing] == ["canyon flood warning"]


async def test_another_tenants_texts_never_appear(
    database: Database, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    await add(database, tenant_a, *FILLER, "zeppelin hangar lease signed")
    await add(database, tenant_b, *FILLER, "zeppelin hangar flooded", "zeppelin museum opened")
    assert await texts_found(database, tenant_a, "zeppelin") == ["zeppelin hangar lease signed"]
    assert set(await texts_found(database, tenant_b, "zeppelin OR hangar")) == {
        "zeppelin hangar flooded",
        "zeppelin museum opened",
    }


HOSTILE = [
    '"',
    '""',
    '"unclosed phrase',
    "OR",
    "OR OR OR",
    "- -- ---",
    "-",
    "AND NOT NEAR(a b)",
    "* ^ : + ~ < > @ ( ) { } [ ]",
    "col:word",
    "'; DROP TABLE text_analyses; --",
    "\\\\ \\' \\\"",
    "&|!<->:*",
    "\u202eevil\u202c",
    "emoji 😀 words",
    "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum()),
    " ".join(chr(c) for c in range(33, 127) if not chr(c).isalnum()),
    "word" * 2_500,
    "ab " * 3_333,
    "x" * 10_000,
]


async def test_the_migration_indexes_existing_texts(empty_database_url: str) -> None:
    """Analyses written before 0003 are found after it (column computed, FTS5 rebuilt,
    FULLTEXT index built over the existing rows)."""
    engine = create_async_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade, "0002")
    finally:
        await engine.dispose()
    database = Database(DatabaseConfig(url=empty_database_url, pool_size=2))
    try:
        async with database.transaction(Tenant.all()) as session:
            org = await OrganizationsRepository(session, Tenant.all()).create("before")
        tenant = Tenant.of(org.id)
        await add(database, tenant, *FILLER, "sextant calibrated before the upgrade")
        await upgrade_to_head(empty_database_url)
        assert await texts_found(database, tenant, "sextant") == [
            "sextant calibrated before the upgrade"
        ]
    finally:
        await database.dispose()


async def test_hard_deletes_leave_the_index_consistent(
    database: Database, tenant_a: Tenant
) -> None:
    ids = await add(database, tenant_a, *FILLER, "astrolabe restored", "astrolabe sold")
    async with database.transaction(tenant_a) as session:
        await session.execute(delete(TextAnalysis).where(TextAnalysis.id == ids["astrolabe sold"]))
    assert await texts_found(database, tenant_a, "astrolabe") == ["astrolabe restored"]
    async with database.transaction(tenant_a) as session:
        if session.get_bind().dialect.name == "sqlite":
            # FTS5 compares its index with the content table and raises on any difference.
            await session.execute(
                text(
                    "INSERT INTO analysis_search(analysis_search, rank) "
                    "VALUES ('integrity-check', 1)"
                )
            )


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def test_hostile_queries_are_plain_searches(database: Database, tenant_a: Tenant) -> None:
    await add(database, tenant_a, *FILLER, "fortress walls restored")
    for query in HOSTILE:
        hits, _ = await search(database, tenant_a, query)
        assert all(h.analysis.organization_id == tenant_a.organization_id for h in hits), query
    # Punctuation around a word is only a separator.
    assert await texts_found(database, tenant_a, '(fortress) "walls" +restored*') == [
        "fortress walls restored"
    ]


async def test_pagination_walks_every_match_once(database: Database, tenant_a: Tenant) -> None:
    """500 matches (scores tie in groups: same text length, same count) and 100 others."""
    rows = [
        {
            "id": uuid.uuid4(),
            "organization_id": tenant_a.organization_id,
            "text": body,
            "content_hash": content_hash(body),
            "analysis_type": S,
        }
        for body in [f"record {i} " + "nebula " * (1 + i % 7) + f"token{i}" for i in range(500)]
        + [f"record {i} unrelated content" for i in range(100)]
    ]
    async with database.transaction(tenant_a) as session:
        await session.execute(insert(TextAnalysis), rows)
    expected = {r["id"] for r in rows[:500]}
    seen: list[uuid.UUID] = []
    scores: list[float] = []
    cursor: list[JSONValue] | None = None
    for _ in range(100):  # bounded: 500 rows in pages of 37 need 14
        hits, cursor = await search(database, tenant_a, "nebula", page_size=37, cursor=cursor)
        seen += [h.analysis.id for h in hits]
        scores += [h.score for h in hits]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 500
    assert set(seen) == expected
    assert scores == sorted(scores, reverse=True)


async def test_postgresql_plan_uses_the_gin_index_under_rls(pg_database_url: str) -> None:
    """5,000 analyses of one organization, ten of them about the searched word: the plan of
    the page statement the repository runs, explained in the same kind of transaction
    (the application role, the tenant's settings, so the RLS policy applies), reads the
    GIN index. Migration 0004 marked ``ts_match_vq`` LEAKPROOF (the suite migrates as a
    superuser); without the mark the planner may not put ``@@`` ahead of the policy and
    reads the organization's rows instead (docs/search.md)."""
    database = Database(DatabaseConfig(url=pg_database_url, app_role=APP_ROLE, pool_size=2))
    try:
        tenant, statement, parameters = await _search_statement(database, pg_database_url)
        plan = await _explain_under_rls(database, tenant, statement, parameters)
    finally:
        await database.dispose()
    assert f"Bitmap Index Scan on {PG_VECTOR_INDEX}" in plan, plan
    assert f"Index Cond: ({PG_VECTOR_COLUMN} @@" in plan, plan

    await _set_leakproof(pg_database_url, False)
    # Fresh connections: a prepared statement keeps the plan it was built with.
    database = Database(DatabaseConfig(url=pg_database_url, app_role=APP_ROLE, pool_size=2))
    try:
        unmarked = await _explain_under_rls(database, tenant, statement, parameters)
    finally:
        await database.dispose()
    assert PG_VECTOR_INDEX not in unmarked, unmarked
    assert f"({PG_VECTOR_COLUMN} @@" in unmarked, unmarked


async def _set_leakproof(url: str, leakproof: bool) -> None:
    owner = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with owner.begin() as conn:
            mark = "LEAKPROOF" if leakproof else "NOT LEAKPROOF"
            await conn.exec_driver_sql(f"ALTER FUNCTION {PG_MATCH_FUNCTION} {mark}")
    finally:
        await owner.dispose()


async def _search_statement(database: Database, migrated_url: str) -> tuple[Tenant, str, Any]:
    """The page statement (and its parameters) of a search for a rare word, over fresh
    statistics."""
    async with database.transaction(Tenant.all()) as session:
        org = await OrganizationsRepository(session, Tenant.all()).create("plan")
    tenant_a = Tenant.of(org.id)
    bodies = [
        f"entry {i} " + ("aurora borealis" if i % 500 == 0 else FILLER[i % 6]) for i in range(5000)
    ]
    rows = [
        {
            "id": uuid.uuid4(),
            "organization_id": tenant_a.organization_id,
            "text": body,
            "content_hash": content_hash(body),
            "analysis_type": S,
        }
        for body in bodies
    ]
    async with database.transaction(tenant_a) as session:
        await session.execute(insert(TextAnalysis), rows)
    captured: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        statement, parameters = args[2:4]
        if "ts_rank_cd" in statement and "ts_headline" not in statement:
            captured.append((statement, parameters))

    async with database.transaction(tenant_a, read_only=True) as session:
        engine = session.get_bind()
        event.listen(engine, "before_cursor_execute", capture)
        try:
            page = await AnalysesRepository(session, tenant_a).search(parse("aurora"), page_size=5)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
    assert len(page.items) == 5
    ((statement, parameters),) = captured
    owner = create_async_engine(migrated_url, poolclass=pool.NullPool)
    try:
        # As autovacuum would: fresh statistics, and the GIN pending list merged.
        async with owner.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text("VACUUM ANALYZE text_analyses"))
    finally:
        await owner.dispose()
    return tenant_a, statement, parameters


async def _explain_under_rls(
    database: Database, tenant: Tenant, statement: str, parameters: Any
) -> str:
    async with database.transaction(tenant, read_only=True) as session:
        conn = await session.connection()
        role = (await conn.exec_driver_sql("SELECT current_user")).scalar_one()
        assert role == APP_ROLE  # subject to the tenant_isolation policy
        explained = await conn.exec_driver_sql("EXPLAIN " + statement, parameters)
        return "\n".join(explained.scalars())
