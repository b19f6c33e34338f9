"""Statement text that is safe to export and stable enough to group by.

Literals (strings, dollar-quoted bodies, numbers) become ``?`` so that no value reaches a
span, a log line or the digest; bind placeholders become ``?`` too and lists of them
(``IN (...)``, multi-row ``VALUES``) collapse, so one query shape is one digest entry
however many values a call sent. Comments go: they carry the caller, not the shape.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["comment_for", "normalize_statement", "operation_of"]

_TOKENS = re.compile(
    r"""
      (?P<comment>/\*.*?\*/|--[^\n]*)
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$)
    | (?P<string>[Ee]'(?:[^'\\]|\\.|'')*'|[BbXxNn]?'(?:[^']|'')*')
    | (?P<ident>"(?:[^"]|"")*")
    | (?P<param>\$\d+|%\(\w+\)s|%s|\?|(?<![:\w]):[A-Za-z_]\w*)
    | (?P<number>(?<![\w$.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w$]))
    """,
    re.VERBOSE | re.DOTALL,
)
_PLACEHOLDER = r"\?(?:::[A-Za-z_][\w ]*?(?:\(\d+(?:,\s*\d+)?\))?(?:\[\])?)?"
_LIST = re.compile(rf"\(\s*{_PLACEHOLDER}(?:\s*,\s*{_PLACEHOLDER})+\s*\)")
_ROWS = re.compile(r"\(\?, \.\.\.\)(?:\s*,\s*\(\?, \.\.\.\))+")
_SPACE = re.compile(r"\s+")
_FIRST_WORD = re.compile(r"[\s(]*([A-Za-z]+)")
#: Normalized statements are exported as span attributes; keep them bounded.
MAX_LENGTH = 4096


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "comment":
        return " "
    if kind == "ident":
        return match.group(0)
    return "?"


@lru_cache(maxsize=4096)
def normalize_statement(statement: str) -> str:
    """``SELECT * FROM t WHERE a = 'x' AND b IN ($1, $2)`` -> ``... a = ? AND b IN (?, ...)``."""
    text = _TOKENS.sub(_replace, statement)
    text = _SPACE.sub(" ", text).strip()
    text = _LIST.sub("(?, ...)", text)
    text = _ROWS.sub("(?, ...), ...", text)
    if len(text) > MAX_LENGTH:
        text = text[: MAX_LENGTH - 3] + "..."
    return text


@lru_cache(maxsize=4096)
def operation_of(statement: str) -> str:
    """The leading SQL keyword, upper-cased (``SELECT``, ``INSERT``, ``WITH``, ...)."""
    match = _FIRST_WORD.match(_TOKENS.sub(_replace, statement[:512]))
    return match.group(1).upper() if match else "SQL"


_COMMENT_SAFE = re.compile(r"[^A-Za-z0-9._/\-]")


def _percent_encode(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode())


@lru_cache(maxsize=1024)
def comment_for(rpc_method: str) -> str:
    """``/* rpc='ferrule.v1.UserService/GetUser' */ `` for prefixing a statement.

    sqlcommenter escaping (percent-encode the value, never a bare quote), but keeping
    ``/`` and ``.`` readable; ``*`` is encoded, so the value can never close the comment.
    Callers on format/pyformat drivers must double ``%`` (see the hooks).
    """
    value = _COMMENT_SAFE.sub(_percent_encode, rpc_method.lstrip("/"))
    return f"/* rpc='{value}' */ "
