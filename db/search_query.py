"""The search query grammar, parsed by Ferrule so that no backend ever sees the caller's text
as query syntax.

Grammar (every input parses; whatever is not one of these is plain words):

* ``word`` - a term; ``"several words"`` - a phrase (the words adjacent and in order);
* ``-word`` / ``-"a phrase"`` - exclusion: no result contains it;
* ``a OR b`` - either (``OR`` in capitals between two included items); items are otherwise
  all required.

Words are runs of letters and digits; any other character separates words. A bare token
holding several runs (``e-mail``, ``don't``) is the phrase of its runs, which is what every
backend's tokenizer makes of it. A query is bounded: at most :data:`MAX_WORDS` words are
kept (later ones are dropped) and a word longer than :data:`MAX_WORD_CHARS` is dropped
(no backend indexes such a word). A query left with no included item matches nothing.

The result is a typed tree (:class:`SearchQuery`); each backend renders it with bound
parameters (:mod:`db.search_sql`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_WORDS = 64
MAX_WORD_CHARS = 80

_WORD = re.compile(r"[^\W_]+")
# A token: a quoted phrase (closing quote optional), or a run of non-space characters.
_TOKEN = re.compile(r'(-?)"([^"]*)"?|(\S+)')


@dataclass(frozen=True, slots=True)
class Phrase:
    """Words that must appear adjacent and in this order; one word is a plain term."""

    words: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """A required item: at least one of these phrases."""

    phrases: tuple[Phrase, ...]


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Every ``required`` item holds and no ``excluded`` phrase appears."""

    required: tuple[AnyOf, ...]
    excluded: tuple[Phrase, ...]

    @property
    def matches_nothing(self) -> bool:
        return not self.required

    def included_words(self) -> tuple[str, ...]:
        """Every word of the included phrases, in query order (what a snippet highlights)."""
        return tuple(w for item in self.required for p in item.phrases for w in p.words)


@dataclass
class _Budget:
    left: int = MAX_WORDS

    def take(self, text: str) -> Phrase | None:
        words = [w.lower() for w in _WORD.findall(text) if len(w) <= MAX_WORD_CHARS]
        words = words[: self.left]
        self.left -= len(words)
        return Phrase(tuple(words)) if words else None


def parse(text: str) -> SearchQuery:
    """The query in ``text``; never raises."""
    budget = _Budget()
    # (negated, phrase) in order, with "OR" markers between them.
    items: list[tuple[bool, Phrase] | None] = []
    for match in _TOKEN.finditer(text):
        quoted_sign, quoted, bare = match.group(1), match.group(2), match.group(3)
        if bare == "OR":
            items.append(None)
            continue
        if bare is not None:
            negated = bare.startswith("-") and len(bare) > 1
            body = bare[1:] if negated else bare
        else:
            negated, body = quoted_sign == "-", quoted
        phrase = budget.take(body)
        if phrase is not None:
            items.append((negated, phrase))
    required: list[AnyOf] = []
    excluded: list[Phrase] = []
    join_next = False
    for index, item in enumerate(items):
        if item is None:
            continue
        negated, phrase = item
        if negated:
            excluded.append(phrase)
            join_next = False
            continue
        follows_or = index > 0 and items[index - 1] is None
        if join_next and follows_or and required:
            required[-1] = AnyOf((*required[-1].phrases, phrase))
        else:
            required.append(AnyOf((phrase,)))
        join_next = True
    return SearchQuery(tuple(required), tuple(excluded))
