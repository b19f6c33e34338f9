"""The one place Ferrule creates SQLAlchemy engines: parameter values never leave in text.

``hide_parameters=True`` keeps bound values out of SQLAlchemy's exception messages
(``[parameters: ...]``) and its statement logging, so a failing INSERT of a user cannot
carry the email or the argon2 hash into a log line, a span's exception event or an error
detail. Every engine (the primary, replicas, the point-read pool, EXPLAIN, migrations)
is built here; a test fails when code creates one any other way.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def async_engine(url: str | URL, **options: Any) -> AsyncEngine:
    """``create_async_engine(url, **options)`` with parameters hidden from every text."""
    return create_async_engine(url, **options, hide_parameters=True)
