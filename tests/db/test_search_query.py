"""The search grammar: what Ferrule makes of a query before any backend sees it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from db.search_query import MAX_WORD_CHARS, MAX_WORDS, AnyOf, Phrase, SearchQuery, parse
from db.search_sql import fts5_query, mysql_boolean_query


def terms(*words: str) -> tuple[AnyOf, ...]:
    return tuple(AnyOf((Phrase((w,)),)) for w in words)


def test_words_are_all_required_lower_cased() -> None:
    assert parse("Volcano  ERUPTION") == SearchQuery(terms("volcano", "eruption"), ())


def test_quoted_phrases_keep_their_order() -> None:
    assert parse('lava "Ash Cloud"') == SearchQuery(
        (AnyOf((Phrase(("lava",)),)), AnyOf((Phrase(("ash", "cloud")),))), ()
    )


def test_an_unclosed_quote_runs_to_the_end() -> None:
    assert parse('"ash cloud') == SearchQuery((AnyOf((Phrase(("ash", "cloud")),)),), ())


def test_minus_excludes_a_word_or_a_phrase() -> None:
    assert parse('lava -ash -"steam vent"') == SearchQuery(
        terms("lava"), (Phrase(("ash",)), Phrase(("steam", "vent")))
    )


def test_or_joins_the_items_beside_it() -> None:
    assert parse("lava OR ash OR steam vent") == SearchQuery(
        (
            AnyOf((Phrase(("lava",)), Phrase(("ash",)), Phrase(("steam",)))),
            AnyOf((Phrase(("vent",)),)),
        ),
        (),
    )


def test_or_without_two_included_neighbours_is_ignored() -> None:
    assert parse("OR lava OR") == SearchQuery(terms("lava"), ())
    assert parse("lava OR -ash") == SearchQuery(terms("lava"), (Phrase(("ash",)),))
    # Only the capitalised operator: "or" is a word.
    assert parse("lava or ash") == SearchQuery(terms("lava", "or", "ash"), ())


def test_punctuation_separates_words_and_joins_a_bare_token_into_a_phrase() -> None:
    assert parse("e-mail (lava)*") == SearchQuery(
        (AnyOf((Phrase(("e", "mail")),)), AnyOf((Phrase(("lava",)),))), ()
    )
    assert parse("!@#$%^&*()_+=[]{};:'\\|,.<>/?~`").matches_nothing


def test_only_exclusions_match_nothing() -> None:
    assert parse("-lava -ash").matches_nothing


def test_queries_are_bounded() -> None:
    query = parse("word " * 1000)
    assert sum(len(p.words) for item in query.required for p in item.phrases) == MAX_WORDS
    assert parse("a" * (MAX_WORD_CHARS + 1)).matches_nothing


def test_backend_syntax_is_rendered_from_the_tree() -> None:
    query = parse('lava OR "ash cloud" -steam')
    assert fts5_query(query) == '(("lava" OR "ash cloud")) NOT ("steam")'
    assert mysql_boolean_query(query) == '+("lava" "ash cloud") -"steam"'
    # InnoDB indexes neither its stopwords nor words under three characters.
    assert mysql_boolean_query(parse("the ox")) == ""


@given(st.text())
def test_every_input_parses_to_words_no_syntax_can_hide_in(text: str) -> None:
    query = parse(text)
    phrases = [p for item in query.required for p in item.phrases] + list(query.excluded)
    for phrase in phrases:
        assert phrase.words
        assert not any(c in "\"'\\()*:+-" or c.isspace() for w in phrase.words for c in w)
        assert fts5_query(SearchQuery((AnyOf((phrase,)),), ())).count('"') == 2
