"""Full-text search over analyses' texts, rendered for each backend from a parsed
:class:`~db.search_query.SearchQuery`; the caller's words only ever travel as bound
parameters.

* PostgreSQL: the generated ``tsvector`` column :data:`PG_VECTOR_COLUMN` (GIN index
  :data:`PG_VECTOR_INDEX`), each phrase a ``phraseto_tsquery`` of the configuration the
  column was built with, ranked by ``ts_rank_cd``, snippets from ``ts_headline``.
* SQLite: the FTS5 external-content table :data:`SQLITE_FTS_TABLE` (kept in step by
  triggers), the FTS5 query string rendered from the tree with every word quoted, ranked by
  ``-bm25()`` (higher is better, as elsewhere), snippets from ``snippet()``.
* MariaDB/MySQL: the FULLTEXT index :data:`MYSQL_FULLTEXT_INDEX` in boolean mode, the
  boolean query rendered from the tree; InnoDB indexes neither its stopwords nor words
  shorter than ``innodb_ft_min_token_size`` (3 by default), so those words are left out of
  the rendered query (a query of nothing else matches nothing). Snippets are cut here.

Snippets are HTML: the text escaped, the matched words in ``<b>``...``</b>``.
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    column,
    false,
    func,
    literal_column,
    not_,
    select,
    table,
    text,
    type_coerce,
)
from sqlalchemy.dialects.mysql import match as mysql_match
from sqlalchemy.dialects.postgresql import REGCONFIG, TSQUERY, TSVECTOR

from db.models.analyses import TextAnalysis
from db.search_query import Phrase, SearchQuery
from db.tenancy import Tenant

if TYPE_CHECKING:
    from db.engine import Database

PG_VECTOR_COLUMN = "search_vector"
PG_VECTOR_INDEX = "ix_text_analyses_search_vector"
SQLITE_FTS_TABLE = "analysis_search"
MYSQL_FULLTEXT_INDEX = "ix_text_analyses_text_fulltext"
#: The function behind ``tsvector @@ tsquery``. Under row-level security the GIN index can
#: serve ``@@`` only while it is LEAKPROOF (migration 0004, docs/search.md).
PG_MATCH_FUNCTION = "pg_catalog.ts_match_vq(tsvector, tsquery)"
#: What a superuser runs in the database when the migration could not.
PG_MARK_MATCH_LEAKPROOF = f"ALTER FUNCTION {PG_MATCH_FUNCTION} LEAKPROOF"
#: Text search configuration used when FERRULE_SEARCH_CONFIG is not set.
DEFAULT_PG_CONFIG = "english"

#: Private-use characters around matches until the snippet is escaped into HTML.
_START, _STOP = "\ue000", "\ue001"
_SNIPPET_WORDS = 24

#: InnoDB's default full-text stopwords (INFORMATION_SCHEMA.INNODB_FT_DEFAULT_STOPWORD).
MYSQL_STOPWORDS = frozenset(
    {"a", "about", "an", "are", "as", "at", "be", "by", "com", "de", "en", "for", "from"}
    | {"how", "i", "in", "is", "it", "la", "of", "on", "or", "that", "the", "this", "to"}
    | {"was", "what", "when", "where", "who", "will", "with", "und", "www"}
)
MYSQL_MIN_TOKEN_CHARS = 3


@dataclass(frozen=True, slots=True)
class RenderedSearch:
    """The pieces a repository composes: the FROM clause's right side (if the search
    reads another table), the match condition and the score (higher is better)."""

    match: ColumnElement[bool]
    score: ColumnElement[float]
    #: SQLite: the FTS table joined on rowid.
    joins_fts: bool = False


def render(query: SearchQuery, dialect: str, pg_config: str) -> RenderedSearch:
    """``query`` as SQL for ``dialect`` (a SQLAlchemy dialect name)."""
    if query.matches_nothing:
        return RenderedSearch(false(), type_coerce(0.0, Float))
    if dialect == "postgresql":
        return _render_postgresql(query, pg_config)
    if dialect == "sqlite":
        return _render_sqlite(query)
    if dialect in ("mysql", "mariadb"):
        return _render_mysql(query)
    raise ValueError(f"no full-text search on {dialect}")


# --- PostgreSQL ---------------------------------------------------------------------------
def pg_vector() -> ColumnElement[Any]:
    return literal_column(f"{TextAnalysis.__tablename__}.{PG_VECTOR_COLUMN}", TSVECTOR())


def _pg_phrase(phrase: Phrase, config: str) -> ColumnElement[Any]:
    cfg = bindparam(None, config, type_=REGCONFIG)
    return func.phraseto_tsquery(cfg, bindparam(None, " ".join(phrase.words)), type_=TSQUERY)


def _pg_positive(query: SearchQuery, config: str) -> ColumnElement[Any]:
    combined: ColumnElement[Any] | None = None
    for item in query.required:
        either: ColumnElement[Any] | None = None
        for phrase in item.phrases:
            q = _pg_phrase(phrase, config)
            either = q if either is None else either.op("||", return_type=TSQUERY)(q)
        assert either is not None
        combined = either if combined is None else combined.op("&&", return_type=TSQUERY)(either)
    assert combined is not None
    return combined


def _render_postgresql(query: SearchQuery, config: str) -> RenderedSearch:
    vector = pg_vector()
    positive = _pg_positive(query, config)
    match = vector.op("@@", return_type=Boolean)(positive)
    excluded = [
        not_(vector.op("@@", return_type=Boolean)(_pg_phrase(p, config))) for p in query.excluded
    ]
    return RenderedSearch(
        and_(match, *excluded), type_coerce(func.ts_rank_cd(vector, positive), Float)
    )


async def pg_match_is_leakproof(database: Database) -> bool:
    """Whether the GIN index can serve ``@@`` under row-level security in this database."""
    statement = text(
        "SELECT proleakproof FROM pg_catalog.pg_proc WHERE oid = CAST(:name AS regprocedure)"
    )
    async with database.transaction(Tenant(None), read_only=True) as session:
        leakproof = await session.scalar(statement, {"name": PG_MATCH_FUNCTION})
    return bool(leakproof)


def pg_headline(query: SearchQuery, config: str) -> ColumnElement[str]:
    options = (
        f"StartSel={_START}, StopSel={_STOP}, MaxWords={_SNIPPET_WORDS}, MinWords=8, MaxFragments=1"
    )
    return func.ts_headline(
        bindparam(None, config, type_=REGCONFIG),
        TextAnalysis.text,
        _pg_positive(query, config),
        bindparam(None, options),
    )


# --- SQLite -------------------------------------------------------------------------------
fts_table = table(SQLITE_FTS_TABLE, column("rowid", Integer))
analysis_rowid = literal_column(f"{TextAnalysis.__tablename__}.rowid", Integer)


def _fts5_phrase(phrase: Phrase) -> str:
    # Words are letters and digits only; doubling quotes keeps that true should it change.
    return '"' + " ".join(w.replace('"', '""') for w in phrase.words) + '"'


def fts5_query(query: SearchQuery) -> str:
    """The FTS5 query string for ``query`` (bound as a parameter, never spliced into SQL)."""
    required = " AND ".join(
        "(" + " OR ".join(_fts5_phrase(p) for p in item.phrases) + ")" for item in query.required
    )
    if not query.excluded:
        return required
    return f"({required}) NOT (" + " OR ".join(_fts5_phrase(p) for p in query.excluded) + ")"


def _fts_match(query: SearchQuery) -> ColumnElement[bool]:
    return literal_column(SQLITE_FTS_TABLE).op("MATCH", return_type=Boolean)(
        bindparam(None, fts5_query(query))
    )


def _render_sqlite(query: SearchQuery) -> RenderedSearch:
    score = type_coerce(-func.bm25(literal_column(SQLITE_FTS_TABLE)), Float)
    return RenderedSearch(_fts_match(query), score, joins_fts=True)


def sqlite_snippets(query: SearchQuery, ids: Sequence[uuid.UUID]) -> Select[uuid.UUID, str]:
    """(id, snippet) of the analyses ``ids``: snippet() needs the MATCH of its own query."""
    snippet = func.snippet(
        literal_column(SQLITE_FTS_TABLE), 0, _START, _STOP, "…", _SNIPPET_WORDS, type_=String
    )
    return (
        select(TextAnalysis.id, snippet)
        .select_from(fts_table.join(TextAnalysis.__table__, analysis_rowid == fts_table.c.rowid))
        .where(_fts_match(query), TextAnalysis.id.in_(ids))
    )


# --- MariaDB / MySQL ----------------------------------------------------------------------
def _mysql_words(phrase: Phrase) -> list[str]:
    return [w for w in phrase.words if len(w) >= MYSQL_MIN_TOKEN_CHARS and w not in MYSQL_STOPWORDS]


def _mysql_phrase(phrase: Phrase) -> str | None:
    words = _mysql_words(phrase)
    return '"' + " ".join(words) + '"' if words else None


def mysql_boolean_query(query: SearchQuery) -> str:
    """The boolean-mode query for ``query``; empty when nothing in it can be searched.

    Words InnoDB does not index are dropped, as PostgreSQL drops its stopwords: an
    alternative left empty is dropped, and so is a required item left with none.
    """
    parts: list[str] = []
    for item in query.required:
        phrases = [p for p in map(_mysql_phrase, item.phrases) if p is not None]
        if phrases:
            parts.append("+(" + " ".join(phrases) + ")")
    if not parts:
        return ""
    parts.extend("-" + p for p in map(_mysql_phrase, query.excluded) if p is not None)
    return " ".join(parts)


def _render_mysql(query: SearchQuery) -> RenderedSearch:
    text = mysql_boolean_query(query)
    if not text:
        return RenderedSearch(false(), type_coerce(0.0, Float))
    relevance = mysql_match(
        TextAnalysis.__table__.c.text, against=bindparam(None, text)
    ).in_boolean_mode()
    # The MATCH itself is the condition: a matching row's relevance may be 0 (a word in
    # every row has no weight), and "relevance > 0" would drop it.
    return RenderedSearch(cast(ColumnElement[bool], relevance), type_coerce(relevance, Float))


def cut_snippet(text: str, words: Sequence[str]) -> str:
    """A snippet of ``text`` around the first of ``words``, every one of them marked (for
    backends without a snippet function); the text's start when none occurs."""
    wanted = {w.lower() for w in words}
    tokens = list(re.finditer(r"[^\W_]+", text))
    hits = [i for i, t in enumerate(tokens) if t.group().lower() in wanted]
    first = max(0, (hits[0] if hits else 0) - _SNIPPET_WORDS // 3)
    window = tokens[first : first + _SNIPPET_WORDS]
    if not window:
        return ""
    start = 0 if first == 0 else window[0].start()
    end = len(text) if first + _SNIPPET_WORDS >= len(tokens) else window[-1].end()
    out: list[str] = ["…" if start > 0 else ""]
    position = start
    for token in window:
        out.append(text[position : token.start()])
        if token.group().lower() in wanted:
            out.append(_START + token.group() + _STOP)
        else:
            out.append(token.group())
        position = token.end()
    out.append(text[position:end])
    out.append("…" if end < len(text) else "")
    return "".join(out)


def snippet_html(raw: str) -> str:
    """A snippet with its match markers as HTML: the text escaped, matches in <b>."""
    return html.escape(raw, quote=False).replace(_START, "<b>").replace(_STOP, "</b>")
